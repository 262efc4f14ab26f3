"""group_advantages: outcome advantages for critic-free RL (GRPO, Dr. GRPO, RLOO, REINFORCE++), one call.

With one score per response and k responses per prompt (``reference.group_advantages`` is the spec):

    grpo                   (r - mean_g) / (std_g + eps)   or  r - mean_g  with norm_by_std=False
    rloo                   r - mean of the other k-1 = k/(k-1) · (r - mean_g)
    reinforce++            score · γ^(valid tokens after t), then whitened over the batch's valid tokens
    reinforce++-baseline   r - mean_g at every valid token, then whitened over the batch's valid tokens

On the kernel backends one pass per row writes the token values (group statistics, the RLOO factor, the
discount walk); the REINFORCE++ variants are then whitened over the batch's valid tokens by the masked
whitening ``compute_advantages`` uses (``reference.masked_whiten`` is its spec, with the rule for fewer
than two valid tokens: zeros). The cpp and cuda backends run all of it as the TORCH_LIBRARY op
``torch.ops.fastrlhf.group_advantages`` (csrc/group_advantages_op.cpp), checks included; the Triton
backend is a Python custom op with the whitening in torch on top. No gradient flows through any of it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastrlhf.ops import reference
from fastrlhf.ops._backend import COMPILED_OP_BACKENDS, pick_backend, runs_compiled_op
from fastrlhf.ops._common import check_discount
from fastrlhf.ops._compiled import CompiledOp
from fastrlhf.ops._dispatch import kernel_op
from fastrlhf.ops._kernels import triton_module
from fastrlhf.ops._validation import (
    FLOAT_DTYPES,
    check_finite,
    check_mask,
    check_same_device,
    check_tensor,
    checks_values,
)

# Estimator → the kernels' mode code (csrc/common/group_advantages.h, OutcomeMode); grpo's depends on
# norm_by_std.
_CENTER, _NORMALIZE, _LEAVE_ONE_OUT, _DISCOUNT = 0, 1, 2, 3

_GROUP_ADVANTAGES = CompiledOp("group_advantages")


class GroupAdvantages(NamedTuple):
    """Both shaped like ``response_mask``, float32 (float64 for float64 scores), 0 at masked positions.

    ``returns`` is the same tensor as ``advantages`` for every estimator but "reinforce++" (as in veRL).
    """

    advantages: torch.Tensor
    returns: torch.Tensor


def group_advantages(
    scores: torch.Tensor,
    response_mask: torch.Tensor,
    estimator: str = "grpo",
    *,
    gamma: float = 1.0,
    eps: float = 1e-6,
    norm_by_std: bool = True,
    backend: str = "auto",
) -> GroupAdvantages:
    """Outcome advantages of k responses per prompt, broadcast to every valid response token.

    Args:
        scores: ``[B, k]`` floating, finite: one outcome score per response; row ``i*k + j`` of a flat
            mask is response j of prompt i.
        response_mask: ``[B, k, T]`` or ``[B*k, T]``, bool or 0/1: the valid response tokens. Holes are
            allowed; REINFORCE++'s discount skips them (it carries over a masked token, like ``gae``),
            where veRL's loop restarts its sum; on right-padded masks the two agree.
        estimator: "grpo", "rloo" (k >= 2), "reinforce++" or "reinforce++-baseline".
        gamma: REINFORCE++'s discount, in [0, 1].
        eps: GRPO's ``std + eps`` (finite, >= 0).
        norm_by_std: GRPO only: False drops the std scaling (Dr. GRPO).
    Returns:
        ``GroupAdvantages(advantages, returns)``. Groups of one (k = 1) follow veRL: mean 0, std 1. An
        all-equal group gives 0; whitening over fewer than 2 valid tokens gives 0 (see
        ``reference.masked_whiten``).
    """
    if runs_compiled_op(backend, scores, response_mask):
        try:
            return _from_op(
                _GROUP_ADVANTAGES(scores, response_mask, estimator, gamma, eps, norm_by_std), estimator
            )
        except TypeError:  # an argument of a type the schema does not take: the checks below name it
            pass
    batch, k, length = check_group_inputs(scores, response_mask, estimator)
    device = check_same_device(scores=scores, response_mask=response_mask)
    mask_u8 = check_mask("response_mask", response_mask)
    gamma = check_discount("gamma", gamma)
    eps = check_finite("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    check_finite_scores(scores)

    chosen = pick_backend(backend, device, dict(scores=scores), fp32_copies=True)
    if chosen in COMPILED_OP_BACKENDS.values():
        out = _GROUP_ADVANTAGES(scores, response_mask, estimator, gamma, eps, bool(norm_by_std))
        return _from_op(out, estimator)
    with torch.no_grad():
        if chosen == "torch":
            advantages, returns = reference.group_advantages(
                scores, mask_u8, estimator, gamma, eps, norm_by_std
            )
            return GroupAdvantages(advantages, returns)
        flat_mask = mask_u8.reshape(batch * k, length).contiguous()
        values = _group_advantages_triton_op(
            scores.detach().reshape(-1).float().contiguous(),
            flat_mask,
            k,
            _mode(estimator, norm_by_std),
            gamma,
            eps,
        )
        shape = response_mask.shape
        advantages, returns = reference.whiten_outcome(values.view(shape), flat_mask.view(shape), estimator)
    return GroupAdvantages(advantages, returns)


def _from_op(out: tuple[torch.Tensor, torch.Tensor], estimator: str) -> GroupAdvantages:
    """The C++ op's (advantages, returns): returns is a tensor of its own only for "reinforce++" (an op's
    outputs may not alias); the other estimators return the advantages themselves."""
    advantages, returns = out
    return GroupAdvantages(advantages, returns if estimator == "reinforce++" else advantages)


def check_group_inputs(
    scores: torch.Tensor, response_mask: torch.Tensor, estimator: str
) -> tuple[int, int, int]:
    """Shapes and the estimator; returns ``(B, k, T)``."""
    check_tensor("scores", scores, FLOAT_DTYPES)
    check_tensor("response_mask", response_mask)
    if scores.dim() != 2:
        raise ValueError(
            f"scores must be 2-D [B, k] (k responses per prompt), got shape {tuple(scores.shape)}"
        )
    batch, k = scores.shape
    if k < 1:
        raise ValueError(f"scores has shape {tuple(scores.shape)}: k (responses per prompt) must be >= 1")
    shape = tuple(response_mask.shape)
    if response_mask.dim() == 3:
        if shape[:2] != (batch, k):
            raise ValueError(f"response_mask has shape {shape}; expected ({batch}, {k}, T) to match scores")
    elif response_mask.dim() == 2:
        if shape[0] != batch * k:
            raise ValueError(
                f"response_mask has shape {shape}; expected ({batch * k}, T): B*k rows for scores "
                f"{tuple(scores.shape)}"
            )
    else:
        raise ValueError(f"response_mask must be [B, k, T] or [B*k, T], got shape {shape}")
    if estimator not in reference.OUTCOME_ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is not one of {reference.OUTCOME_ESTIMATORS}")
    if estimator == "rloo" and k < 2:
        raise ValueError(
            f"estimator='rloo' needs k >= 2 responses per prompt (a leave-one-out baseline), "
            f"but scores has shape {tuple(scores.shape)} (k={k})"
        )
    return batch, k, shape[-1]


def check_finite_scores(scores: torch.Tensor) -> None:
    """NaN or inf scores would spread through a whole group (or, whitened, the batch). One reduction,
    skipped while torch.compile traces (``checks_values``)."""
    if scores.numel() == 0 or not checks_values():
        return
    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        bad = scores[~finite]
        raise ValueError(f"scores must be finite; {bad.numel()} value(s) are not (first: {bad[0].item()})")


def _mode(estimator: str, norm_by_std: bool) -> int:
    if estimator == "grpo":
        return _NORMALIZE if norm_by_std else _CENTER
    if estimator == "rloo":
        return _LEAVE_ONE_OUT
    if estimator == "reinforce++":
        return _DISCOUNT
    return _CENTER  # reinforce++-baseline: r - group mean, whitened afterwards


# The Triton backend's custom op (the compiled backends have the C++ op, csrc/group_advantages_op.cpp).
@kernel_op("fastrlhf::group_advantages_fwd")
def _group_advantages_triton_op(
    scores: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    mode: int,
    gamma: float,
    eps: float,
) -> torch.Tensor:
    """scores f32 ``[N]``, mask uint8 ``[N, T]`` → f32 ``[N, T]``: each row's value at its valid tokens."""
    return triton_module("group_advantages").group_advantages_forward(
        scores, mask, group_size, mode, gamma, eps
    )


@_group_advantages_triton_op.register_fake
def _(scores, mask, group_size, mode, gamma, eps):
    return torch.empty(mask.shape, dtype=torch.float32, device=mask.device)
