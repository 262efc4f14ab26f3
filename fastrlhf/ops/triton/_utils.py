"""Helpers shared by the Triton launchers."""

from __future__ import annotations

import contextlib

import torch
import triton

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
