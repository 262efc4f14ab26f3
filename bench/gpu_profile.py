"""Where a call's time goes on the GPU: host (Python, dispatch, launches) against device (kernels).

On an H200 the Triton KL forward at 2M tokens took 83 µs a call in ``bench/run.py`` against eager torch's
35 µs, for 25 MB that move in about 6 µs at copy speed; the ranking loss lost to eager too. ``do_bench``
times the stream between two events, so a call whose host work outlasts its kernels reads as slow
whatever the kernels do. This script separates the two for each (op, backend, mode):

- ``wall``: seconds per call over ``--calls`` calls with one synchronize at the end (what ``do_bench``
  sees when the host is the bottleneck);
- ``device``: the kernels' own time per call, summed from the profiler's device events;
- ``host``: the profiler's CPU time per call of the top-level call (its own Python included).

``wall`` near ``device``: the kernels are the cost. ``wall`` near ``host`` and far above ``device``: the
host is, and the top CPU-side operators printed under each row name where it goes.

    python bench/gpu_profile.py                    # every case, on the GPU (the CPU without one)
    python bench/gpu_profile.py --ops kl_penalty --backends triton,cuda --calls 200
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import common
import torch

from fastrlhf.ops import available_backends, gather_logprobs, kl_penalty, ranking_loss

BACKENDS = ("torch", "cuda", "triton", "cpp")


def kl_case(device: str, backend: str) -> tuple[Callable[[], torch.Tensor], list[torch.Tensor]]:
    """k3 per token over B=256, T=8192 (2M tokens) with a bool mask, gradients to both inputs."""
    logprobs = -torch.rand(256, 8192, device=device).requires_grad_()
    ref = -torch.rand(256, 8192, device=device).requires_grad_()
    mask = torch.rand(256, 8192, device=device) < 0.9
    return lambda: kl_penalty(logprobs, ref, mask, "k3", backend=backend), [logprobs, ref]


def ranking_case(device: str, backend: str) -> tuple[Callable[[], torch.Tensor], list[torch.Tensor]]:
    """N=8192 prompts with K=9 ranked responses: all 36 pairs per prompt."""
    rewards = torch.randn(8192, 9, device=device).requires_grad_()
    ranks = torch.argsort(torch.rand(8192, 9, device=device), dim=1) + 1
    return lambda: ranking_loss(rewards, ranks, backend=backend).loss, [rewards]


def gather_case(device: str, backend: str) -> tuple[Callable[[], torch.Tensor], list[torch.Tensor]]:
    """N=8192 rows of V=32000 fp32 logits."""
    logits = torch.randn(8192, 32000, device=device).requires_grad_()
    labels = torch.randint(0, 32000, (8192,), device=device)
    return lambda: gather_logprobs(logits, labels, backend=backend), [logits]


CASES = {"kl_penalty": kl_case, "ranking_loss": ranking_case, "gather_logprobs": gather_case}


def one_call(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor], mode: str) -> None:
    if mode == "fwd":
        with torch.no_grad():
            fn()
        return
    for leaf in leaves:
        leaf.grad = None
    fn().sum().backward()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def wall_seconds(call: Callable[[], None], device: str, calls: int) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        call()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def profile(call: Callable[[], None], device: str, calls: int, top: int) -> tuple[float, float, str]:
    """(device seconds per call, host seconds per call, the top CPU-side operators as a table)."""
    from torch.profiler import ProfilerActivity, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            with record_function("one_call"):
                call()
        synchronize(device)
    averages = prof.key_averages()
    device_us = sum(_self_device_us(event) for event in averages)
    host_us = next((e.cpu_time_total for e in averages if e.key == "one_call"), 0.0)
    table = averages.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48)
    return device_us / calls / 1e6, host_us / calls / 1e6, table


def _self_device_us(event) -> float:
    # torch >= 2.4 names it self_device_time_total; older releases self_cuda_time_total.
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ops", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    parser.add_argument(
        "--backends", default="torch,cuda,triton", help=f"comma list of {', '.join(BACKENDS)}"
    )
    parser.add_argument("--modes", default="fwd,full", help="comma list of fwd, full (forward+backward)")
    parser.add_argument(
        "--calls", type=int, default=100, help="calls per measurement, after 10 warm-up calls"
    )
    parser.add_argument("--top", type=int, default=8, help="CPU-side operators listed per case")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda")
    )
    args = parser.parse_args()
    ops = args.ops.split(",")
    unknown = [op for op in ops if op not in CASES]
    if unknown:
        parser.error(f"--ops: unknown {unknown}; choose from {list(CASES)}")
    if args.calls < 1:
        parser.error(f"--calls must be >= 1, got {args.calls}")
    infos = available_backends()
    print(f"device: {common.device_name(args.device)}; torch {torch.__version__}")
    summary = []
    for op in ops:
        for backend in args.backends.split(","):
            info = infos.get(backend)
            if info is None or not info.available or args.device not in info.devices:
                reason = "unknown backend" if info is None else info.reason or f"not on {args.device}"
                print(f"{op} {backend}: skipped: {reason}")
                continue
            fn, leaves = CASES[op](args.device, backend)
            for mode in args.modes.split(","):

                def call(fn=fn, leaves=leaves, mode=mode):
                    one_call(fn, leaves, mode)

                for _ in range(10):  # warm-up: JIT compiles, allocator, autotuning
                    call()
                wall = wall_seconds(call, args.device, args.calls)
                device_s, host_s, table = profile(call, args.device, args.calls, args.top)
                line = (
                    f"{op:16s} {backend:7s} {mode:4s} wall {wall * 1e6:9.1f} µs"
                    f"  device {device_s * 1e6:9.1f} µs  host {host_s * 1e6:9.1f} µs"
                )
                print(line + "\n" + table, flush=True)
                summary.append(line)
    print("\n".join(["", "summary (per call):", *summary]))


if __name__ == "__main__":
    main()
