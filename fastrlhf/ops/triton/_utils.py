"""Helpers shared by the Triton launchers and kernels."""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl


def _interpreted() -> bool:
    """Whether ``triton.jit`` makes interpreted kernels in this process (it decides at decoration)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# fp32 e^x accurate to a few ulp over the whole range. Compiled for a GPU, tl.exp is
# ex2.approx(x * log2 e), whose relative error grows like |x| * 2^-24 from the rounded product (k3 =
# e^{-d} - 1 + d missed its 1e-6 relative bound at large gaps on an H200); libdevice's expf reduces the
# argument exactly first. The interpreter has no libdevice, and its tl.exp is numpy's, accurate already.
if _interpreted():

    @triton.jit
    def exp_accurate(x):
        return tl.exp(x)

else:
    from triton.language.extra import libdevice

    @triton.jit
    def exp_accurate(x):
        return libdevice.exp(x)


# Largest vocabulary block one program loads per loop step: 4096 elements over 8 warps is 16 per thread
# (two 16-byte loads in bf16), enough bytes in flight per program without spilling registers.
MAX_BLOCK_V = 4096
# Smallest block: keeps tiny vocabularies (V=1, 7) on a well-formed layout; masked lanes cost nothing.
MIN_BLOCK_V = 16


def device_context(tensor: torch.Tensor):
    """The tensor's CUDA device as the current one (a no-op for CPU tensors under the interpreter).

    Triton launches on the current CUDA device, which need not be the tensor's.
    """
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def check_block_v(block_v: int | None) -> None:
    """Refuse a vocabulary block that is not a power of two (None means automatic)."""
    if block_v is not None and (block_v < 1 or block_v & (block_v - 1)):
        raise ValueError(f"block_v must be a power of two, got {block_v}")


def row_block_v(n_cols: int) -> int:
    """The vocabulary block for rows of ``n_cols``: its next power of two, clamped to the block range."""
    return max(MIN_BLOCK_V, min(triton.next_power_of_2(max(n_cols, 1)), MAX_BLOCK_V))


def row_num_warps(block_v: int) -> int:
    """Warps for a program that walks a row in blocks of ``block_v``."""
    # Aim for 8-16 elements per thread: enough independent loads in flight, few registers.
    if block_v >= 4096:
        return 8
    if block_v >= 1024:
        return 4
    return 2
