"""Benchmark logprobs straight from hidden states, and the fused PPO policy loss, side by side.

    python bench/bench_linear_logprobs.py            # N=4096, H=512, V=32000 on CPU (larger on GPU)
    python bench/bench_linear_logprobs.py --quick    # small sizes, a smoke run

Ops and providers:
- ``linear_logprobs``: eager ``hidden @ W.T → log_softmax → gather``; TRL's chunked logprob
  (``trl.kernels.ChunkedLogProbFunction``, at the chunk size its trainers use); ``fastrlhf.linear_logprobs``
  on each backend available here.
- ``linear_ppo_policy_loss``: eager logprobs followed by the clipped PPO loss, against the fused
  ``fastrlhf.linear_ppo_policy_loss`` (gradient made in the chunked forward pass).
Modes: ``fwd`` (no grad) and ``full`` (forward + backward into hidden and weight). Time: median (p20,
p80) of repeats after a warm-up. Memory: peak bytes above the inputs, measured for real in a fresh
subprocess per case (CPU RSS) or with ``max_memory_allocated`` (GPU); it includes the gradients.
Appends to ``bench/results/linear_logprobs.csv`` and prints a markdown table with the issue's targets.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from fastrlhf.ops import available_backends, linear_logprobs, linear_ppo_policy_loss  # noqa: E402
from fastrlhf.ops import reference as ref_ops  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = {"cpu": [(4096, 512, 32000)], "cuda": [(4096, 512, 32000), (16384, 4096, 151936)]}
QUICK_SIZES = [(256, 64, 4000)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OPS = ("linear_logprobs", "linear_ppo_policy_loss")
TRL_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE, what TRL's trainers pass
# Issue 4's targets for forward+backward on CPU: (memory vs eager, time vs eager), both "at most".
TARGETS = {"linear_logprobs": (0.25, 1.2)}
TARGET_SIZE = "N=4096,H=512,V=32000"


# ------------------------------------------------------------------------------------------ providers


def eager_logprobs(hidden, weight, labels):
    """What trainers write by hand: the full logits, an fp32 log-softmax, a gather."""
    valid = labels != -100
    logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    return logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * valid


def trl_chunked(hidden, weight, labels):
    from trl.kernels import ChunkedLogProbFunction

    valid = labels != -100
    logprobs = ChunkedLogProbFunction.apply(
        hidden, weight, None, labels.clamp_min(0), 1.0, TRL_CHUNK, None, 1.0, ()
    )
    return logprobs[0] * valid


def eager_ppo(hidden, weight, labels, rollout):
    logprobs = eager_logprobs(hidden, weight, labels)
    return ref_ops.ppo_policy_loss(logprobs, rollout["old"], rollout["adv"], rollout["mask"]).loss


def providers(op: str, device: str) -> dict:
    """name -> (callable or None, reason when skipped)."""
    infos = available_backends()
    kernel_backends = {}
    for backend in ("cpp", "cuda", "triton"):
        info = infos[backend]
        usable = info.available and device in info.devices and not (backend == "triton" and device == "cpu")
        reason = info.reason if not info.available else f"runs on {info.devices}, not {device}"
        kernel_backends[backend] = (usable, reason)
    if op == "linear_logprobs":
        out = {"eager": (eager_logprobs, "")}
        try:
            import trl.kernels  # noqa: F401

            out["trl-chunked"] = (trl_chunked, "")
        except ImportError as exc:
            out["trl-chunked"] = (None, f"trl.kernels not importable ({exc})")
        for backend, (usable, reason) in kernel_backends.items():
            fn = (lambda h, w, y, b=backend: linear_logprobs(h, w, y, backend=b)) if usable else None
            out[f"fastrlhf-{backend}"] = (fn, "" if usable else reason)
        return out
    out = {"eager": (eager_ppo, "")}
    for backend, (usable, reason) in kernel_backends.items():
        fn = None
        if usable:

            def fn(h, w, y, rollout, b=backend):
                return linear_ppo_policy_loss(
                    h, w, y, rollout["old"], rollout["adv"], rollout["mask"], backend=b
                ).loss

        out[f"fastrlhf-{backend}"] = (fn, "" if usable else reason)
    return out


# ------------------------------------------------------------------------------------------ cases


def make_inputs(tokens, hidden_size, vocab, dtype, device, requires_grad):
    gen = torch.Generator(device="cpu").manual_seed(tokens * 7 + vocab + hidden_size)
    hidden = torch.randn(tokens, hidden_size, generator=gen).to(dtype).to(device)
    # lm_head scale: logits of a few nats, neither flat nor one-hot
    weight = (
        (torch.randn(vocab, hidden_size, generator=gen) * (2.0 / math.sqrt(hidden_size))).to(dtype).to(device)
    )
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[torch.rand(tokens, generator=gen) < 0.05] = -100
    rollout = {
        "old": (-torch.rand(tokens, generator=gen) * 5).to(device),
        "adv": torch.randn(tokens, generator=gen).to(device),
        "mask": (labels != -100).to(device),
    }
    return (
        hidden.requires_grad_(requires_grad),
        weight.requires_grad_(requires_grad),
        labels.to(device),
        rollout,
    )


def make_step(op, fn, hidden, weight, labels, rollout, mode):
    def forward():
        if op == "linear_logprobs":
            return fn(hidden, weight, labels).sum()
        return fn(hidden, weight, labels, rollout)

    if mode == "fwd":

        def step():
            with torch.no_grad():
                return forward()
    else:

        def step():
            hidden.grad = weight.grad = None
            forward().backward()
            return hidden.grad, weight.grad

    return step


def memory_case(case: dict, answer_path: str) -> None:
    """Subprocess entry: build the inputs, measure one call's peak extra RSS / GPU memory."""
    torch.set_num_threads(case["threads"])
    fn = providers(case["op"], case["device"])[case["provider"]][0]
    tokens, hidden_size, vocab = case["size"]
    hidden, weight, labels, rollout = make_inputs(
        tokens, hidden_size, vocab, DTYPES[case["dtype"]], case["device"], case["mode"] == "full"
    )
    step = make_step(case["op"], fn, hidden, weight, labels, rollout, case["mode"])
    measure = common.measure_peak_extra_gpu if case["device"] == "cuda" else common.measure_peak_extra_cpu
    with open(answer_path, "w") as fh:
        json.dump({"peak_extra_bytes": measure(step)}, fh)


def target_verdict(op, size, provider, mode, device, time_ratio, memory_ratio) -> str:
    """'met' / 'MISSED (...)' for fastrlhf against the issue's CPU targets, at the size they name."""
    if (
        op not in TARGETS
        or size != TARGET_SIZE
        or not provider.startswith("fastrlhf")
        or mode != "full"
        or device != "cpu"
        or memory_ratio is None
    ):
        return ""
    max_memory, max_time = TARGETS[op]
    misses = []
    if memory_ratio > max_memory:
        misses.append(f"memory {memory_ratio:.3f} > {max_memory}")
    if time_ratio > max_time:
        misses.append(f"time {time_ratio:.2f} > {max_time}")
    return (
        "MISSED (" + "; ".join(misses) + ")" if misses else f"met (mem ≤ {max_memory}x, time ≤ {max_time}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke run)")
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--dtypes", default=None, help="default: fp32 on CPU, fp32,bf16 on GPU")
    parser.add_argument("--modes", default="fwd,full")
    parser.add_argument("--reps", type=int, default=5, help="timed repeats per case (after a warm-up)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--csv", default=os.path.join(HERE, "results", "linear_logprobs.csv"))
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)
    parser.add_argument("--answer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_case:
        memory_case(json.loads(args.memory_case), args.answer)
        return

    device = args.device
    sizes = QUICK_SIZES if args.quick else SIZES[device]
    dtypes = args.dtypes or ("fp32" if device == "cpu" else "fp32,bf16")
    reps = 2 if args.quick else args.reps
    rows, table = [], []
    for op in args.ops.split(","):
        available = providers(op, device)
        for name, (fn, reason) in available.items():
            if fn is None:
                print(f"{op}: skipped {name}: {reason}")
        for tokens, hidden_size, vocab in sizes:
            size = f"N={tokens},H={hidden_size},V={vocab}"
            for dtype_name in dtypes.split(","):
                for mode in args.modes.split(","):
                    results = {}
                    for name, (fn, _) in available.items():
                        if fn is None:
                            continue
                        hidden, weight, labels, rollout = make_inputs(
                            tokens, hidden_size, vocab, DTYPES[dtype_name], device, mode == "full"
                        )
                        step = make_step(op, fn, hidden, weight, labels, rollout, mode)
                        med, p20, p80 = common.time_fn(step, device, reps=reps)
                        del hidden, weight, labels, rollout, step
                        mem = None
                        if not args.no_memory:
                            case = dict(
                                op=op,
                                provider=name,
                                size=[tokens, hidden_size, vocab],
                                dtype=dtype_name,
                                mode=mode,
                                device=device,
                                threads=torch.get_num_threads(),
                            )
                            mem = common.run_in_subprocess(os.path.abspath(__file__), case)[
                                "peak_extra_bytes"
                            ]
                        results[name] = (med, mem)
                        base = common.base_row(op, device) | dict(
                            provider=name, mode=mode, size=size, dtype=dtype_name
                        )
                        rows.append(base | dict(metric="time", median=med, p20=p20, p80=p80, unit="s"))
                        if mem is not None:
                            rows.append(
                                base
                                | dict(metric="peak_extra_memory", median=mem, p20=mem, p80=mem, unit="B")
                            )
                        print(
                            f"{op} {size} {dtype_name} {mode:4s} {name:16s} {med * 1e3:9.1f} ms "
                            f"(p20 {p20 * 1e3:.1f}, p80 {p80 * 1e3:.1f})"
                            + ("" if mem is None else f"  peak extra {mem / 2**20:8.1f} MiB"),
                            flush=True,
                        )
                    eager_t, eager_m = results["eager"]
                    for name, (med, mem) in results.items():
                        memory_ratio = None if mem is None or not eager_m else mem / eager_m
                        table.append(
                            [
                                op,
                                size,
                                dtype_name,
                                mode,
                                name,
                                f"{med * 1e3:.1f}",
                                f"{med / eager_t:.2f}x",
                                "" if mem is None else f"{mem / 2**20:.0f}",
                                "" if memory_ratio is None else f"{memory_ratio:.3f}x",
                                target_verdict(op, size, name, mode, device, med / eager_t, memory_ratio),
                            ]
                        )
    common.write_csv(rows, args.csv)
    print(f"\nwrote {len(rows)} rows to {os.path.relpath(args.csv)}")
    print(f"device: {common.device_name(device)}; torch {torch.__version__}\n")
    headers = [
        "op",
        "size",
        "dtype",
        "mode",
        "provider",
        "median ms",
        "time / eager",
        "peak extra MiB",
        "memory vs eager",
        "target",
    ]
    print(common.markdown_table(headers, table))


if __name__ == "__main__":
    main()
