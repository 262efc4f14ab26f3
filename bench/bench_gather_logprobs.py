"""Benchmark gather_logprobs side by side: eager torch, TRL, and every fastrlhf backend available here.

    python bench/bench_gather_logprobs.py            # the issue's sizes, fp32 and bf16
    python bench/bench_gather_logprobs.py --quick    # small sizes, a smoke run

Inputs are ``[B, T, V]`` logits (B=8, as a trainer feeds them, so TRL's per-sequence loop runs as it
does in TRL) and ``[B, T]`` labels with 5% ignored positions. Modes: ``fwd`` (no grad) and ``full``
(forward + backward of ``logprobs.sum()``). Time: median (p20, p80) of repeats. Memory: peak bytes
above the inputs, from a fresh subprocess per case (CPU) or ``max_memory_allocated`` (GPU).
Appends to ``bench/results/gather_logprobs.csv`` and prints a markdown table last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from fastrlhf.ops import available_backends, gather_logprobs  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH = 8  # sequences per batch; N = BATCH * T tokens
SIZES = [(8192, 32000), (2048, 151936)]
QUICK_SIZES = [(512, 32000)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def eager(logits, labels):
    """What trainers write by hand: a full fp32 log-softmax, then a gather."""
    valid = labels != -100
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * valid


def trl_selective(logits, labels):
    from trl.trainer.utils import selective_log_softmax

    valid = labels != -100
    return selective_log_softmax(logits, labels.clamp_min(0)) * valid


def providers(device: str) -> dict:
    """name -> (callable or None, reason when skipped)."""
    out = {"eager": (eager, "")}
    try:
        import trl.trainer.utils  # noqa: F401

        out["trl"] = (trl_selective, "")
    except ImportError as exc:
        out["trl"] = (None, f"trl not installed ({exc})")
    infos = available_backends()
    for backend in ("cpp", "cuda", "triton"):
        info = infos[backend]
        usable = info.available and device in info.devices and not (backend == "triton" and device == "cpu")
        fn = (lambda x, y, b=backend: gather_logprobs(x, y, backend=b)) if usable else None
        reason = info.reason if not info.available else f"runs on {info.devices}, not {device}"
        out[f"fastrlhf-{backend}"] = (fn, "" if usable else reason)
    return out


def make_inputs(tokens: int, vocab: int, dtype: torch.dtype, device: str, requires_grad: bool):
    gen = torch.Generator(device="cpu").manual_seed(tokens * 7 + vocab)
    shape = (BATCH, tokens // BATCH)
    logits = torch.empty(*shape, vocab, dtype=dtype, device=device)
    for b in range(BATCH):  # filled per sequence so no fp32 [N, V] temporary inflates the baseline
        logits[b] = (torch.randn(shape[1], vocab, generator=gen) * 2.0).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < 0.05] = -100
    return logits.requires_grad_(requires_grad), labels.to(device)


def make_step(fn, logits, labels, mode):
    if mode == "fwd":

        def step():
            with torch.no_grad():
                return fn(logits, labels)
    else:

        def step():
            logits.grad = None
            fn(logits, labels).sum().backward()
            return logits.grad

    return step


def memory_case(case: dict, answer_path: str) -> None:
    """Subprocess entry: build the inputs, measure one call's peak extra RSS / GPU memory."""
    torch.set_num_threads(case["threads"])
    fn = providers(case["device"])[case["provider"]][0]
    logits, labels = make_inputs(
        case["tokens"], case["vocab"], DTYPES[case["dtype"]], case["device"], case["mode"] == "full"
    )
    step = make_step(fn, logits, labels, case["mode"])
    measure = common.measure_peak_extra_gpu if case["device"] == "cuda" else common.measure_peak_extra_cpu
    with open(answer_path, "w") as fh:
        json.dump({"peak_extra_bytes": measure(step)}, fh)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke run)")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--modes", default="fwd,full")
    parser.add_argument("--providers", default="all", help="comma list, e.g. eager,trl,fastrlhf-cpp")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--csv", default=os.path.join(HERE, "results", "gather_logprobs.csv"))
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)
    parser.add_argument("--answer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_case:
        memory_case(json.loads(args.memory_case), args.answer)
        return

    device = args.device
    sizes = QUICK_SIZES if args.quick else SIZES
    available = providers(device)
    wanted = list(available) if args.providers == "all" else args.providers.split(",")
    rows, table = [], []
    for name in wanted:
        if available[name][0] is None:
            print(f"skipped {name}: {available[name][1]}")
    for tokens, vocab in sizes:
        for dtype_name in args.dtypes.split(","):
            for mode in args.modes.split(","):
                results = {}
                for name in wanted:
                    fn = available[name][0]
                    if fn is None:
                        continue
                    logits, labels = make_inputs(tokens, vocab, DTYPES[dtype_name], device, mode == "full")
                    step = make_step(fn, logits, labels, mode)
                    med, p20, p80 = common.time_fn(step, device, min_run_time=0.5 if args.quick else 3.0)
                    del logits, labels, step
                    mem = None
                    if not args.no_memory:
                        case = dict(
                            provider=name,
                            tokens=tokens,
                            vocab=vocab,
                            dtype=dtype_name,
                            mode=mode,
                            device=device,
                            threads=torch.get_num_threads(),
                        )
                        mem = common.run_in_subprocess(os.path.abspath(__file__), case)["peak_extra_bytes"]
                    results[name] = (med, p20, p80, mem)
                    size = f"N={tokens},V={vocab}"
                    base = common.base_row("gather_logprobs", device) | dict(
                        provider=name, mode=mode, size=size, dtype=dtype_name
                    )
                    rows.append(base | dict(metric="time", median=med, p20=p20, p80=p80, unit="s"))
                    if mem is not None:
                        rows.append(
                            base | dict(metric="peak_extra_memory", median=mem, p20=mem, p80=mem, unit="B")
                        )
                    print(
                        f"{size} {dtype_name} {mode:4s} {name:16s} {med * 1e3:9.2f} ms "
                        f"(p20 {p20 * 1e3:.2f}, p80 {p80 * 1e3:.2f})"
                        + ("" if mem is None else f"  peak extra {mem / 2**20:9.1f} MiB"),
                        flush=True,
                    )
                logits_bytes = tokens * vocab * torch.empty(0, dtype=DTYPES[dtype_name]).element_size()
                eager_t, _, _, eager_m = results["eager"]
                for name, (med, _, _, mem) in results.items():
                    table.append(
                        [
                            f"N={tokens} V={vocab}",
                            dtype_name,
                            mode,
                            name,
                            f"{med * 1e3:.1f}",
                            f"{eager_t / med:.2f}x",
                            "" if mem is None else f"{mem / 2**20:.0f}",
                            "" if mem is None or not eager_m else f"{mem / eager_m:.3f}",
                            "" if mem is None else f"{100 * mem / logits_bytes:.2f}%",
                        ]
                    )
    common.write_csv(rows, args.csv)
    print(f"\nwrote {len(rows)} rows to {os.path.relpath(args.csv)}")
    print(f"device: {common.device_name(device)}; torch {torch.__version__}\n")
    headers = [
        "size",
        "dtype",
        "mode",
        "provider",
        "median ms",
        "speed-up vs eager",
        "peak extra MiB",
        "memory vs eager",
        "memory / logits",
    ]
    print(common.markdown_table(headers, table))


if __name__ == "__main__":
    main()
