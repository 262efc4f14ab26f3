"""OpenRLHF-signature functions and loss modules on fastrlhf's kernels, and ``patch()`` for OpenRLHF.

Semantics restated from OpenRLHF:

- ``openrlhf/models/utils.py``, ``log_probs_from_logits``: log-prob of each label under
  ``softmax(logits / temperature)``.
- same file, ``compute_approx_kl``: k1 ``p - q``, k2 ``(p - q)²/2``, k3 ``exp(q - p) - 1 - (q - p)`` in
  float32, clamped to [-10, 10] (the releases with the clamp; unknown names raise ValueError).
- ``openrlhf/trainer/ppo_utils/experience_maker.py``, ``get_advantages_and_returns`` (a method of the
  experience maker): values and rewards multiplied by ``action_mask``, then the plain reverse GAE loop
  over every position (next value 0 past the end), ``returns = advantages + masked values``.
- ``openrlhf/models/loss.py``, ``PairWiseLoss`` (``mean(-logσ(c - r - margin))``) and ``LogExpLoss``
  (``mean(log(1 + exp(r - c)))``, the same loss written without a margin).

Differences, all deliberate: results are float32 (float64 for float64 input); ``log_probs_from_logits``
does not divide the caller's logits in place (OpenRLHF's ``logits.div_(temperature)`` mutates them);
``LogExpLoss`` stays finite at any reward gap (OpenRLHF's ``log(1 + exp(x))`` overflows to inf); padding
that holds NaN does not leak into GAE results (OpenRLHF multiplies by the mask, and NaN·0 is NaN); k3 at
a ``-inf`` log-prob is the clamp, 10, with a zero gradient (OpenRLHF computes ``inf - inf`` = NaN there).
"""

from __future__ import annotations

import torch
from torch import nn

from fastrlhf import ops
from fastrlhf.compat._patching import PatchHandle, Target, apply, unpatch_all

__all__ = [
    "LogExpLoss",
    "PairWiseLoss",
    "compute_approx_kl",
    "get_advantages_and_returns",
    "log_probs_from_logits",
    "patch",
    "unpatch",
]

_KL_ESTIMATORS = ("k1", "k2", "k3")
# OpenRLHF bounds every estimate to [-10, 10] before it becomes a reward or a loss term.
_KL_CLAMP = 10.0


def log_probs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probability of each label under ``softmax(logits / temperature)``.

    Args:
        logits: ``[..., V]`` float32 / bfloat16 / float16 / float64 (not modified).
        labels: ``[...]`` integer in ``[0, V)``.
        temperature: > 0.
    Returns:
        ``[...]`` float32 (float64 for float64 logits).
    """
    return ops.gather_logprobs(logits, labels, temperature)


def compute_approx_kl(
    log_probs: torch.Tensor,
    log_probs_base: torch.Tensor,
    kl_estimator: str = "k1",
    *,
    action_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token KL estimate of ``log_probs`` against ``log_probs_base``, clamped to [-10, 10].

    Args:
        log_probs, log_probs_base: ``[B, T]`` (any one shape), floating; gradients flow to both.
        kl_estimator: "k1", "k2" or "k3".
        action_mask: keyword-only, for the older OpenRLHF signature: 0 where the mask is 0.
    Returns:
        The input shape, float32 (float64 for float64 input).
    """
    if kl_estimator not in _KL_ESTIMATORS:
        raise ValueError(f"Unknown kl_estimator: {kl_estimator!r} (expected one of {_KL_ESTIMATORS})")
    return ops.kl_penalty(log_probs, log_probs_base, action_mask, kl_estimator, clamp=_KL_CLAMP)


@torch.no_grad()
def get_advantages_and_returns(
    values: torch.Tensor | list[torch.Tensor],
    rewards: torch.Tensor | list[torch.Tensor],
    action_mask: torch.Tensor | list[torch.Tensor] | None,
    gamma: float,
    lambd: float,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
    """GAE advantages and returns with OpenRLHF's masking.

    Args:
        values, rewards: ``[B, T]`` floating, or (packed samples, older OpenRLHF) lists of ``[T_i]``.
        action_mask: ``[B, T]`` 0/1 or bool (a list of ``[T_i]`` for lists), or None.
        gamma, lambd: discount and GAE λ in [0, 1].
    Returns:
        ``(advantages, returns)`` like ``values``, float32. Unlike veRL's, OpenRLHF's masked steps are not
        skipped: they count as steps with reward 0 and value 0, so a step before a hole sees next value 0.
    """
    if isinstance(values, (list, tuple)):
        return _packed(values, rewards, action_mask, gamma, lambd)
    if action_mask is not None:
        keep = action_mask.bool()
        values = torch.where(keep, values, torch.zeros_like(values))
        rewards = torch.where(keep, rewards, torch.zeros_like(rewards))
    # With zeros at the masked steps, OpenRLHF's loop is ops.gae with every step valid: the mask-carry
    # (veRL) semantics only differ where a step is skipped, and here none is.
    every_step = torch.ones(values.shape, dtype=torch.bool, device=values.device)
    return ops.gae(rewards, values, every_step, gamma, lambd)


def _packed(values, rewards, action_mask, gamma, lambd):
    """One kernel call for a list of samples of different lengths: right-pad with zeros (a zero reward and
    value past a sample's end is exactly the loop's "next value 0"), then cut each sample back out."""
    masks = [None] * len(values) if action_mask is None else list(action_mask)
    if not len(masks) == len(rewards) == len(values):
        raise ValueError(
            f"packed samples: {len(values)} values, {len(rewards)} rewards, {len(masks)} action masks"
        )

    def row(x, mask):
        return (x if mask is None else torch.where(mask.bool(), x, torch.zeros_like(x))).reshape(-1)

    pad = torch.nn.utils.rnn.pad_sequence
    value_rows = pad([row(v, m) for v, m in zip(values, masks, strict=True)], batch_first=True)
    reward_rows = pad([row(r, m) for r, m in zip(rewards, masks, strict=True)], batch_first=True)
    advantages, returns = get_advantages_and_returns(value_rows, reward_rows, None, gamma, lambd)
    cut = [(i, v.shape, v.numel()) for i, v in enumerate(values)]
    return (
        [advantages[i, :n].reshape(shape) for i, shape, n in cut],
        [returns[i, :n].reshape(shape) for i, shape, n in cut],
    )


def _pairs(chosen: torch.Tensor, rejected: torch.Tensor, margin):
    """Flatten to the ``[N]`` pairs ``ops.pairwise_loss`` takes (OpenRLHF averages over every element)."""
    if torch.is_tensor(margin):
        chosen, rejected, margin = torch.broadcast_tensors(chosen, rejected, margin)
        margin = margin.reshape(-1)
    else:
        chosen, rejected = torch.broadcast_tensors(chosen, rejected)
    return chosen.reshape(-1), rejected.reshape(-1), margin


class PairWiseLoss(nn.Module):
    """Reward-model loss ``mean(-logσ(chosen - reject - margin))`` on fastrlhf's ranking-loss kernel."""

    def forward(
        self, chosen_reward: torch.Tensor, reject_reward: torch.Tensor, margin: torch.Tensor | None = None
    ) -> torch.Tensor:
        """chosen_reward, reject_reward: ``[N]`` (any one shape); margin: broadcastable tensor or None.
        Returns the scalar loss (float32)."""
        return ops.pairwise_loss(*_pairs(chosen_reward, reject_reward, margin)).loss


class LogExpLoss(nn.Module):
    """Reward-model loss ``mean(log(1 + exp(reject - chosen)))`` (Anthropic HH, arXiv:2204.05862): the
    pairwise loss without margin, computed stably. ``margin`` is accepted and ignored, as in OpenRLHF."""

    def forward(
        self, chosen_reward: torch.Tensor, reject_reward: torch.Tensor, margin: torch.Tensor | None = None
    ) -> torch.Tensor:
        """chosen_reward, reject_reward: ``[N]`` (any one shape). Returns the scalar loss (float32)."""
        return ops.pairwise_loss(*_pairs(chosen_reward, reject_reward, None)).loss


def _get_advantages_and_returns_method(self, values, rewards, action_mask, gamma, lambd):
    """``get_advantages_and_returns`` in the shape of the experience maker's method (patch target)."""
    return get_advantages_and_returns(values, rewards, action_mask, gamma, lambd)


def _targets() -> list[Target]:
    utils = "openrlhf.models.utils"
    loss = "openrlhf.models.loss"
    return [
        Target(utils, "log_probs_from_logits", log_probs_from_logits),
        Target(utils, "compute_approx_kl", compute_approx_kl),
        # The class holding it was renamed across releases (NaiveExperienceMaker, RemoteExperienceMaker):
        # patch it on whichever classes define it.
        Target(
            "openrlhf.trainer.ppo_utils.experience_maker",
            "*.get_advantages_and_returns",
            _get_advantages_and_returns_method,
        ),
        Target(loss, "PairWiseLoss", PairWiseLoss),
        Target(loss, "LogExpLoss", LogExpLoss),
    ]


def patch() -> PatchHandle:
    """Make the installed OpenRLHF call fastrlhf's kernels.

    Swaps ``openrlhf.models.utils``'s ``log_probs_from_logits`` and ``compute_approx_kl``, the experience
    maker's ``get_advantages_and_returns``, and ``openrlhf.models.loss``'s ``PairWiseLoss`` and
    ``LogExpLoss``, plus every copy in loaded ``openrlhf.*`` modules. Call it before building the trainer
    (a loss module built earlier keeps its class). Returns a handle whose ``unpatch()`` (or
    ``with patch(): ...``) restores OpenRLHF. Without OpenRLHF it warns and does nothing.
    """
    return apply("openrlhf", "openrlhf", _targets())


def unpatch() -> None:
    """Undo every active ``patch()`` of OpenRLHF."""
    unpatch_all("openrlhf")
