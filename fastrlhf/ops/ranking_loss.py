"""ranking_loss: InstructGPT's K-wise pairwise ranking loss, and the K=2 chosen/rejected form.

Each prompt's C(K,2) comparisons form one batch element: the kernels compute, per prompt, the mean of
``-logσ(r_w - r_l - margin)`` over its pairs (and its accuracy and pair count) in one pass over the
``[K, K]`` pair table. The cpp and cuda backends run the TORCH_LIBRARY op ``torch.ops.fastrlhf.ranking_loss``
(csrc/ranking_loss_op.cpp), whose checks, mean over prompts and autograd formula are C++; the Triton
backend is a Python custom op whose mean over prompts is the kernels' shared epilogue
(ops/triton/reduce.py), on the device, and whose backward is one kernel.
"""

from __future__ import annotations

import torch

from fastrlhf.ops import reference
from fastrlhf.ops._backend import COMPILED_OP_BACKENDS, pick_backend, runs_compiled_op
from fastrlhf.ops._compiled import CompiledOp
from fastrlhf.ops._dispatch import kernel_op
from fastrlhf.ops._kernels import kernel_module, optional_mask
from fastrlhf.ops._validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_finite,
    check_mask,
    check_same_device,
    check_same_shape,
    check_tensor,
)
from fastrlhf.ops.reference import RankingLossResult

_RANKING_LOSS = CompiledOp("ranking_loss")


def ranking_loss(
    rewards: torch.Tensor,
    ranks: torch.Tensor,
    mask: torch.Tensor | None = None,
    margin: float = 0.0,
    backend: str = "auto",
) -> RankingLossResult:
    """K-wise pairwise ranking loss over all valid pairs of each prompt.

    Args:
        rewards: ``[N, K]`` floating, the reward model's scores of K responses per prompt.
        ranks: ``[N, K]`` integer, 1 = best; equal ranks form no pair.
        mask: ``[N, K]`` 0/1 or bool, the responses present (K varies per prompt), or None (all).
        margin: subtracted from each pair's reward gap.
    Returns:
        ``RankingLossResult(loss, accuracy, num_prompts_without_pairs)``: the mean over prompts of each
        prompt's mean pair loss, the accuracy (fraction of pairs ordered right) weighted the same way, and
        how many prompts had no pair (fewer than 2 valid responses, or only ties) and so count for nothing.
    """
    if runs_compiled_op(backend, rewards, ranks, mask):
        try:
            return RankingLossResult(*_RANKING_LOSS(rewards, ranks, mask, margin))
        except TypeError:  # an argument of a type the schema does not take: the checks below name it
            pass
    check_tensor("rewards", rewards, FLOAT_DTYPES)
    check_tensor("ranks", ranks, INDEX_DTYPES)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be 2-D [prompts, K], got shape {tuple(rewards.shape)}")
    check_same_shape("rewards", rewards, ranks=ranks, mask=mask)
    device = check_same_device(rewards=rewards, ranks=ranks, mask=mask)
    if rewards.shape[1] < 2:
        raise ValueError(f"rewards has K={rewards.shape[1]} responses per prompt; a ranking needs K >= 2")
    margin = check_finite("margin", margin)
    mask_u8 = None if mask is None else check_mask("mask", mask)
    if mask_u8 is not None and mask_u8.shape[0] and int(mask_u8.sum(1).max()) < 2:
        raise ValueError("mask leaves every prompt with fewer than 2 responses: there is no pair to rank")

    chosen = pick_backend(backend, device, dict(rewards=rewards), fp32_copies=True)
    if chosen in COMPILED_OP_BACKENDS.values():
        return RankingLossResult(*_RANKING_LOSS(rewards, ranks, mask, margin))
    if chosen == "torch":
        return reference.ranking_loss(rewards, ranks, mask_u8, margin)
    # No mask: an empty one, which the kernels take as every response present (no [N, K] of ones).
    mask_arg = rewards.new_empty(0, dtype=torch.uint8) if mask_u8 is None else mask_u8.contiguous()
    loss, accuracy, without_pairs, _normalizer = _mean_op(
        rewards.float().contiguous(), ranks.long().contiguous(), mask_arg, margin, chosen
    )
    return RankingLossResult(loss, accuracy, without_pairs)


def pairwise_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    backend: str = "auto",
) -> RankingLossResult:
    """The K=2 form: ``mean(-logσ(chosen - rejected - margin))`` and its accuracy.

    Args:
        chosen, rejected: ``[N]`` rewards of the preferred and the other response.
        margin: None, a float, or an ``[N]`` tensor of per-pair margins (as in Llama 2's RM loss).
    """
    check_tensor("chosen", chosen, FLOAT_DTYPES)
    check_tensor("rejected", rejected, FLOAT_DTYPES)
    if chosen.dim() != 1:
        raise ValueError(f"chosen must be 1-D [N], got shape {tuple(chosen.shape)}")
    check_same_shape("chosen", chosen, rejected=rejected)
    check_same_device(chosen=chosen, rejected=rejected)
    shifted = rejected
    if torch.is_tensor(margin):
        check_same_shape("chosen", chosen, margin=margin)
        # A per-pair margin shifts the rejected reward: r_c - (r_r + m) is the same gap.
        shifted, margin = rejected + margin.to(rejected.dtype), 0.0
    rewards = torch.stack([chosen, shifted], dim=1)
    ranks = torch.tensor([1, 2], device=chosen.device).expand(chosen.shape[0], 2)
    out = ranking_loss(rewards, ranks, None, 0.0 if margin is None else margin, backend=backend)
    # Accuracy is about the rewards themselves, not the margin-shifted gap.
    accuracy = (chosen > rejected).float().mean() if chosen.numel() else out.accuracy
    return RankingLossResult(out.loss, accuracy.detach(), out.num_prompts_without_pairs)


# The Triton backend's custom ops (the compiled backends have the C++ op above).
@kernel_op("fastrlhf::ranking_loss_mean_fwd")
def _mean_op(
    rewards: torch.Tensor, ranks: torch.Tensor, mask: torch.Tensor, margin: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """rewards f32 ``[N, K]``, ranks int64, mask uint8 ``[N, K]`` or ``[0]`` (none) → (loss, accuracy) f32
    scalars, the means over the prompts with a pair; num_prompts_without_pairs int64; the normalizer f32
    (prompts with a pair, >= 1)."""
    module = kernel_module(backend, "ranking_loss")
    return tuple(module.ranking_loss_mean(rewards, ranks, optional_mask(backend, mask), margin))


@_mean_op.register_fake
def _(rewards, ranks, mask, margin, backend):
    loss, accuracy, normalizer = (rewards.new_empty(()) for _ in range(3))
    return loss, accuracy, rewards.new_empty((), dtype=torch.int64), normalizer


@kernel_op("fastrlhf::ranking_loss_bwd")
def _backward_op(
    grad_loss: torch.Tensor,
    rewards: torch.Tensor,
    ranks: torch.Tensor,
    mask: torch.Tensor,
    normalizer: torch.Tensor,
    margin: float,
    backend: str,
) -> torch.Tensor:
    """d(grad_loss · loss)/d rewards, f32 ``[N, K]``, for ``_mean_op``'s loss and normalizer."""
    module = kernel_module(backend, "ranking_loss")
    mask = optional_mask(backend, mask)
    return module.ranking_loss_backward(grad_loss, rewards, ranks, mask, margin, normalizer=normalizer)


@_backward_op.register_fake
def _(grad_loss, rewards, ranks, mask, normalizer, margin, backend):
    return torch.empty_like(rewards)


def _setup_context(ctx, inputs, output):
    rewards, ranks, mask, margin, backend = inputs
    ctx.save_for_backward(rewards, ranks, mask, output[3])
    ctx.options = (margin, backend)
    ctx.mark_non_differentiable(output[1], output[2], output[3])
    # Only the loss takes a gradient: no zero tensors (fill launches on a GPU) stand in for the others'.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_accuracy, _grad_without_pairs, _grad_normalizer):
    if grad_loss is None:
        return None, None, None, None, None
    rewards, ranks, mask, normalizer = ctx.saved_tensors
    margin, backend = ctx.options
    d_rewards = _backward_op(grad_loss.to(torch.float32), rewards, ranks, mask, normalizer, margin, backend)
    return d_rewards, None, None, None, None


_mean_op.register_autograd(_backward, setup_context=_setup_context)
