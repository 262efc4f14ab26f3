"""value_loss: PPO's clipped value loss for the critic.

Elementwise over ``[B, T]`` with one masked reduction, so it is plain torch (``reference.value_loss``)
behind the same argument checks as every op.
"""

from __future__ import annotations

import torch

from fastrlhf.ops import reference
from fastrlhf.ops._validation import (
    FLOAT_DTYPES,
    check_mask,
    check_positive_finite,
    check_same_device,
    check_same_shape,
    check_tensor,
)
from fastrlhf.ops.reference import LOSS_AGGREGATIONS, ValueLossResult


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = 0.2,
    loss_agg: str = "token-mean",
) -> ValueLossResult:
    """Clipped value loss: ``½·max((v - R)², (v_old + clip(v - v_old, -clip, clip) - R)²)`` per valid token.

    Args:
        values: ``[B, T]`` the critic's current values (differentiable).
        old_values: ``[B, T]`` the values at rollout time; returns: ``[B, T]`` the targets (constants).
        mask: ``[B, T]`` 0/1 or bool. clip: > 0, or None for the plain ``½(v - R)²``.
        loss_agg: "token-mean" or "seq-mean-token-mean" (as in ``ppo_policy_loss``).
    Returns:
        ``ValueLossResult(loss, clip_fraction)``.
    """
    for name, t in (("values", values), ("old_values", old_values), ("returns", returns)):
        check_tensor(name, t, FLOAT_DTYPES)
    check_same_shape("values", values, old_values=old_values, returns=returns, mask=mask)
    check_same_device(values=values, old_values=old_values, returns=returns, mask=mask)
    if clip is not None:
        clip = check_positive_finite("clip", clip)
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_agg={loss_agg!r} is not one of {LOSS_AGGREGATIONS}")
    if loss_agg == "seq-mean-token-mean" and values.dim() != 2:
        raise ValueError(
            "loss_agg='seq-mean-token-mean' needs [batch, time] inputs, "
            f"got values of shape {tuple(values.shape)}"
        )
    return reference.value_loss(values, old_values, returns, check_mask("mask", mask), clip, loss_agg)
