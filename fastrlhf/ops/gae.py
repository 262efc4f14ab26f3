"""gae: generalised advantage estimation with veRL's mask-carry semantics, and masked whitening.

``gae`` walks each row from the end (see ``reference.gae``): a C++ row loop on CPU, a block scan of affine
maps in Triton, a per-row scan in CUDA. No gradient flows through it. The cpp and cuda backends run the
TORCH_LIBRARY op ``torch.ops.fastrlhf.gae`` (csrc/gae_op.cpp), whose checks are C++; the Triton backend is
a Python custom op.
"""

from __future__ import annotations

import torch

from fastrlhf.ops import reference
from fastrlhf.ops._backend import COMPILED_OP_BACKENDS, pick_backend, runs_compiled_op
from fastrlhf.ops._common import check_discount, check_sequences
from fastrlhf.ops._compiled import CompiledOp
from fastrlhf.ops._dispatch import kernel_op
from fastrlhf.ops._kernels import kernel_module
from fastrlhf.ops._validation import (
    check_mask,
    check_same_device,
    check_same_shape,
    check_tensor,
    checks_values,
)

_GAE = CompiledOp("gae")


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns of per-token rewards.

    Args:
        rewards, values: ``[B, T]`` floating. mask: ``[B, T]`` 0/1 or bool; holes are allowed (a masked
            step is skipped: the next value and the running advantage carry over it).
        gamma, lam: discount and GAE λ, in [0, 1].
    Returns:
        ``(advantages[B, T], returns[B, T])`` float32 (float64 for float64 values), 0 where masked.
    """
    if runs_compiled_op(backend, rewards, values, mask):
        try:
            return _GAE(rewards, values, mask, gamma, lam)
        except TypeError:  # an argument of a type the schema does not take: the checks below name it
            pass
    check_tensor("rewards", rewards)
    mask_u8 = check_sequences(values, mask, rewards=rewards)
    device = check_same_device(rewards=rewards, values=values, mask=mask)
    gamma = check_discount("gamma", gamma)
    lam = check_discount("lam", lam)
    chosen = pick_backend(backend, device, dict(values=values), fp32_copies=True)
    if chosen == "torch":
        return reference.gae(rewards, values, mask_u8, gamma, lam)
    if chosen in COMPILED_OP_BACKENDS.values():
        return _GAE(rewards, values, mask, gamma, lam)
    return _gae_triton_op(
        rewards.detach().float().contiguous(),
        values.detach().float().contiguous(),
        mask_u8.contiguous(),
        gamma,
        lam,
    )


@kernel_op("fastrlhf::gae_fwd")
def _gae_triton_op(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards, values float32 ``[B, T]``, mask uint8 ``[B, T]`` → (advantages, returns) float32."""
    adv, ret = kernel_module("triton", "gae").gae_forward(rewards, values, mask, gamma, lam)
    return adv, ret


@_gae_triton_op.register_fake
def _(rewards, values, mask, gamma, lam):
    return torch.empty_like(values), torch.empty_like(values)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Whiten ``x`` over the masked positions: ``(x - mean) / sqrt(var + 1e-8)``, unbiased variance.

    Args:
        x: any floating shape. mask: the same shape, 0/1 or bool; at least 2 set positions.
        shift_mean: False keeps the mean (only rescales), as TRL and OpenRLHF do for some uses.
    Returns:
        The whitened tensor, 0 at unmasked positions. Differentiable.
    """
    check_tensor("x", x)
    check_same_shape("x", x, mask=mask)
    check_same_device(x=x, mask=mask)
    mask_u8 = check_mask("mask", mask)
    check_whiten_count(mask_u8)
    return reference.masked_whiten(x, mask_u8, shift_mean)


def check_whiten_count(mask_u8: torch.Tensor) -> None:
    """Refuse a mask with fewer than 2 set positions (no variance to estimate), as the C++ op does.

    Skipped while torch.compile traces (``checks_values``): ``reference.masked_whiten`` then gives 0,
    never NaN.
    """
    if not checks_values():
        return
    count = int(mask_u8.sum())
    if count < 2:
        raise ValueError(f"mask must select at least 2 positions to estimate a variance, it selects {count}")
