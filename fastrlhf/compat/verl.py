"""veRL-signature functions on fastrlhf's kernels, and ``patch()`` to swap them into an installed veRL.

Semantics restated from veRL (volcengine/verl, now verl-project/verl):

- ``verl/utils/torch_functional.py``, ``logprobs_from_logits``: log-prob of each label, through flash-attn's
  cross-entropy kernel when present (which writes d(logits) into the logits buffer when
  ``inplace_backward``) and ``logprobs_from_logits_v2``'s row loop otherwise.
- ``verl/trainer/ppo/core_algos.py``, ``compute_gae_advantage_return``: GAE with mask-carry over masked
  steps, ``returns = advantages + values``, then ``masked_whiten`` of the advantages.
- same file, ``kl_penalty`` / ``kl_penalty_forward``: "kl"/"k1", "abs", "mse"/"k2", "low_var_kl"/"k3"
  (with ``ref - logp`` clamped to [-20, 20] before ``exp`` and the estimate clamped to [-10, 10]), and the
  ``"+"`` suffix (e.g. "k3+"): the estimator's value with the k2 gradient (straight-through).

Differences, all deliberate: results are float32 (float64 for float64 input) whatever the input dtype;
``compute_gae_advantage_return`` returns 0 at masked positions (veRL leaves the carried advantage and
``values`` there, which every veRL consumer masks out: ``agg_loss``, ``masked_mean``, the metrics).
"""

from __future__ import annotations

import torch

from fastrlhf import ops
from fastrlhf.compat._patching import PatchHandle, Target, apply, unpatch_all

__all__ = [
    "compute_gae_advantage_return",
    "kl_penalty",
    "kl_penalty_forward",
    "logprobs_from_logits",
    "patch",
    "unpatch",
]

# veRL's estimator names → (our estimator, clamp of the estimate). Only low_var_kl is clamped in veRL.
_ESTIMATORS = {
    "kl": ("k1", None),
    "k1": ("k1", None),
    "abs": ("abs", None),
    "mse": ("k2", None),
    "k2": ("k2", None),
    "low_var_kl": ("k3", 10.0),
    "k3": ("k3", 10.0),
}


def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True
) -> torch.Tensor:
    """Log-probability of each label under ``softmax(logits)``.

    Args:
        logits: ``[..., V]`` float32 / bfloat16 / float16 / float64.
        labels: ``[...]`` integer in ``[0, V)``; -100 gives 0 (flash-attn's ignore_index, veRL's GPU path).
        inplace_backward: write d(logits) into the logits buffer during backward, as veRL's flash-attn path
            does: only when nothing else reads ``logits`` afterwards (veRL turns it off when it also
            computes the entropy from the same logits).
    Returns:
        ``[...]`` float32 (float64 for float64 logits).
    """
    return ops.gather_logprobs(logits, labels, inplace_backward=inplace_backward)


def compute_gae_advantage_return(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float | torch.Tensor,
    lam: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages (whitened over the response tokens) and returns, no gradient.

    Args:
        token_level_rewards, values: ``[B, T]`` floating. response_mask: ``[B, T]`` 0/1 or bool; holes are
            skipped (the next value and the running advantage carry over them), as in veRL.
        gamma, lam: floats (or 0-d tensors, as veRL's signature allows) in [0, 1].
    Returns:
        ``(advantages, returns)``, ``[B, T]`` float32, 0 at masked positions. The whitening needs at
        least 2 response tokens (veRL raises too).
    """
    with torch.no_grad():
        # ops.gae already has veRL's mask-carry semantics; returns are taken before whitening, as in veRL.
        advantages, returns = ops.gae(token_level_rewards, values, response_mask, float(gamma), float(lam))
        advantages = ops.masked_whiten(advantages, response_mask)
    return advantages, returns


def kl_penalty_forward(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """veRL's per-token KL estimate ``kl_penalty`` (no ``"+"`` suffix) of ``logprob`` against ``ref_logprob``.

    Args:
        logprob, ref_logprob: ``[B, T]`` (any one shape), floating; gradients flow to both.
        kl_penalty: "kl"/"k1", "abs", "mse"/"k2" or "low_var_kl"/"k3" (clamped to [-10, 10]).
    Returns:
        The input shape, float32 (float64 for float64 input).
    """
    if kl_penalty not in _ESTIMATORS:
        # veRL raises NotImplementedError for "full" and for any name it does not know.
        raise NotImplementedError(f"kl_penalty={kl_penalty!r}: supported are {sorted(_ESTIMATORS)}")
    estimator, clamp = _ESTIMATORS[kl_penalty]
    # veRL clamps ref - logp to [-20, 20] before exp(); past about [-11, 2.6] k3 exceeds the output clamp
    # of 10 anyway, so the inner clamp only matters at logp = -inf, where the op's clamped k3 also gives
    # 10 with a zero gradient (it caps the gap itself; see ops.reference.kl_penalty).
    return ops.kl_penalty(logprob, ref_logprob, estimator=estimator, clamp=clamp)


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """``kl_penalty_forward``, or with a ``"+"`` suffix (e.g. "k3+") its value with the k2 estimator's
    gradient (veRL's straight-through trick: the expected k2 gradient is the KL gradient).

    Args / Returns: as ``kl_penalty_forward``.
    """
    forward_name = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
    value = kl_penalty_forward(logprob, ref_logprob, forward_name)
    if not kl_penalty.endswith("+") or forward_name in ("mse", "k2"):
        return value
    surrogate = ops.kl_penalty(logprob, ref_logprob, estimator="k2")
    return value.detach() + (surrogate - surrogate.detach())


def _targets() -> list[Target]:
    core = "verl.trainer.ppo.core_algos"
    return [
        Target("verl.utils.torch_functional", "logprobs_from_logits", logprobs_from_logits),
        Target(core, "compute_gae_advantage_return", compute_gae_advantage_return),
        Target(core, "kl_penalty", kl_penalty),
        Target(core, "kl_penalty_forward", kl_penalty_forward, optional=True),  # newer veRL only
    ]


def patch() -> PatchHandle:
    """Make the installed veRL call fastrlhf's kernels.

    Swaps ``verl.utils.torch_functional.logprobs_from_logits`` and ``verl.trainer.ppo.core_algos``'s
    ``compute_gae_advantage_return``, ``kl_penalty`` (and ``kl_penalty_forward``), plus every copy of them
    in loaded ``verl.*`` modules and registries (``ADV_ESTIMATOR_REGISTRY["gae"]``). Returns a handle
    whose ``unpatch()`` (or ``with patch(): ...``) restores veRL. Without veRL it warns and does nothing.
    """
    return apply("verl", "verl", _targets())


def unpatch() -> None:
    """Undo every active ``patch()`` of veRL."""
    unpatch_all("verl")
