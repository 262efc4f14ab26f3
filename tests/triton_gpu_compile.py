"""Compiles every Triton kernel of fastrlhf for a CUDA GPU, down to the cubin, on a machine without one.

The Triton interpreter, which the CPU tests use, accepts code that the real compiler refuses (a plain
Python global read inside a kernel, for one: seen on an H200, where it broke the group-advantage kernels
that every CPU test had passed). This script drives the real launchers in fastrlhf/ops/triton with CPU
tensors, but with Triton's active driver replaced by one that reports a CUDA target and every launch
turned into a compile-only warm-up: each specialization the launchers ask for is compiled by the same
compiler a GPU would run (TTIR, TTGIR, LLVM IR, PTX, then ptxas), and nothing is launched.

    python tests/triton_gpu_compile.py 90      # sm_90 (H100/H200); 80 for A100

Prints one line per kernel with its compiled specializations and exits non-zero on the first error.
Run it without TRITON_INTERPRET (tests/test_triton_gpu_compile.py starts it in a clean subprocess).
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("triton_gpu_compile.py compiles for a GPU: run it without TRITON_INTERPRET")

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

COMPILED: dict[str, set] = defaultdict(set)  # kernel name -> its distinct compiled specializations


class CompileOnlyDriver:
    """The part of Triton's active driver that ``JITFunction.run`` reads: a device, a stream, a target."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target


def compile_only(run):
    """Every ``kernel[grid](...)`` compiles its specialization (warmup=True) and launches nothing."""

    def warm(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        COMPILED[self.fn.__name__].add(id(kernel))
        return kernel

    return warm


def drive_every_launcher() -> None:
    """Calls each launcher over its modes, dtypes and shape classes (the outputs are never computed)."""
    from fastrlhf.ops.triton import (
        advantages,
        gae,
        gather_logprobs,
        group_advantages,
        kl_penalty,
        ranking_loss,
    )

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for rows, vocab in ((3, 7), (4, 5003), (1, 151936)):  # small, ragged, one long row (split V)
            logits = torch.randn(rows, vocab).to(dtype)
            labels = torch.randint(0, vocab, (rows,))
            for with_entropy in (False, True) if dtype == torch.float32 else (True,):
                logprobs, stats, entropy = gather_logprobs.gather_logprobs_forward(
                    logits, labels, 0.8, -100, with_entropy
                )
                gather_logprobs.gather_logprobs_backward(
                    torch.ones(rows),
                    torch.ones(rows) if with_entropy else None,
                    logits,
                    labels,
                    stats,
                    entropy,
                    0.8,
                    -100,
                    torch.empty_like(logits),
                )
        # The estimator and the clamp are compile-time choices: every one in fp32, one in each low dtype.
        a, b = torch.randn(70).to(dtype), torch.randn(70).to(dtype)
        for estimator in range(4) if dtype == torch.float32 else (2,):  # k1, k2, k3, abs
            for mask in (None, torch.rand(70) < 0.7):
                for clamp in (0.0, 5.0) if dtype == torch.float32 else (0.0,):
                    kl_penalty.kl_penalty_forward(a, b, mask, estimator, clamp)
                    # Per token: an upstream gradient per token or one value, with or without d ref.
                    for grad in (torch.ones(70), torch.ones(())):
                        for ref_grad in (False, True):
                            kl_penalty.kl_penalty_backward(
                                grad, a, b, mask, estimator, clamp, ref_grad=ref_grad
                            )
                    # The means: per row (7 rows) and over every token, and their backward.
                    for rows in (7, None):
                        mean, normalizer = kl_penalty.kl_penalty_mean(a, b, mask, estimator, clamp, rows)
                        for grad in (torch.ones(mean.shape), torch.ones(())):
                            kl_penalty.kl_penalty_backward(
                                grad,
                                a,
                                b,
                                mask,
                                estimator,
                                clamp,
                                normalizer=normalizer,
                                rows=rows,
                                ref_grad=True,
                            )
        rewards, ranks = torch.randn(6, 9).to(dtype), torch.randint(1, 10, (6, 9))
        for mask in (None, torch.rand(6, 9) < 0.8):
            ranking_loss.ranking_loss_forward(rewards, ranks, mask, 0.5)
            ranking_loss.ranking_loss_backward(torch.ones(6), rewards, ranks, mask, 0.5)
            loss, _, _, normalizer = ranking_loss.ranking_loss_mean(rewards, ranks, mask, 0.5)
            ranking_loss.ranking_loss_backward(
                torch.ones(()), rewards, ranks, mask, 0.5, normalizer=normalizer
            )
    for steps in (5, 300, 3000):  # one block, several, past the largest block
        rewards, values = torch.randn(4, steps), torch.randn(4, steps)
        mask = (torch.rand(4, steps) < 0.8).to(torch.uint8)
        gae.gae_forward(rewards, values, mask, 0.99, 0.95)
        if steps == 300:  # the block-size choice is gae's, already compiled above
            continue
        for estimator in range(4):
            advantages.advantages_forward(
                torch.randn(4), rewards, values, values, mask, 0.05, estimator, 0.0, 1.0, 0.95
            )
        for group_size in (1, 4):
            for mode in range(4):
                if mode == group_advantages.LEAVE_ONE_OUT and group_size == 1:
                    continue
                group_advantages.group_advantages_forward(torch.randn(4), mask, group_size, mode, 0.99, 1e-6)


def main(arch: int) -> int:
    driver.set_active(CompileOnlyDriver(GPUTarget("cuda", arch, 32)))
    JITFunction.run = compile_only(JITFunction.run)
    drive_every_launcher()
    for name, kernels in sorted(COMPILED.items()):
        print(f"sm_{arch}: {name}: {len(kernels)} specializations compiled")
    return 0 if COMPILED else 1


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
