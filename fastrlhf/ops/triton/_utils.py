"""Helpers shared by the Triton launchers."""

from __future__ import annotations

import contextlib

import torch


def device_context(tensor: torch.Tensor):
    """The tensor's CUDA device as the current one (a no-op for CPU tensors under the interpreter).

    Triton launches on the current CUDA device, which need not be the tensor's.
    """
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
