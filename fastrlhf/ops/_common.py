"""Argument checks shared by the sequence ops (GAE, the experience step)."""

from __future__ import annotations

import torch

from fastrlhf.ops._validation import FLOAT_DTYPES, check_finite, check_mask, check_same_shape, check_tensor


def check_discount(name: str, value: float) -> float:
    """γ and λ: finite and in [0, 1]."""
    value = check_finite(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def check_sequences(values: torch.Tensor, mask: torch.Tensor, **same_shape: torch.Tensor) -> torch.Tensor:
    """values ``[B, T]`` floating, the others the same shape; returns the mask as uint8."""
    check_tensor("values", values, FLOAT_DTYPES)
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D [batch, time], got shape {tuple(values.shape)}")
    for name, t in same_shape.items():
        check_tensor(name, t, FLOAT_DTYPES)
    check_same_shape("values", values, mask=mask, **same_shape)
    return check_mask("mask", mask)
