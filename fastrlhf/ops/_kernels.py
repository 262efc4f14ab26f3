"""Where each backend's kernels live, so every op dispatches the same way."""

from __future__ import annotations

import importlib

from fastrlhf._extension import extension


def compiled():
    """``fastrlhf._C``: the C++ CPU kernels and, in a CUDA build, the CUDA kernels."""
    return extension()


def triton_module(op: str):
    """``fastrlhf.ops.triton.<op>``, imported on first use (importing triton is slow)."""
    return importlib.import_module(f"fastrlhf.ops.triton.{op}")


def kernel_module(backend: str, op: str):
    """The module whose ``<op>_forward`` / ``<op>_backward`` functions run ``op`` on ``backend``."""
    return triton_module(op) if backend == "triton" else compiled()


def optional_mask(backend: str, mask):
    """The compiled kernels take an empty tensor for "no mask", the Triton wrappers take None."""
    if backend == "triton":
        return mask if mask is not None and mask.numel() else None
    return mask
