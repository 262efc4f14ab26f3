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
- same file, ``compute_grpo_outcome_advantage``, ``compute_rloo_outcome_advantage``,
  ``compute_reinforce_plus_plus_outcome_advantage`` and
  ``compute_reinforce_plus_plus_baseline_outcome_advantage``: each row's score is
  ``token_level_rewards.sum(-1)`` (REINFORCE++ discounts the token rewards themselves); ``index`` groups
  rows by prompt id, in any order and of any size; a group of one gets mean 0 (and std 1 for GRPO), and
  RLOO leaves its score unchanged.

Differences, all deliberate: results are float32 (float64 for float64 input) whatever the input dtype;
``compute_gae_advantage_return`` and ``compute_reinforce_plus_plus_outcome_advantage`` return 0 at masked
positions (veRL leaves the carried advantage and ``values``, or its running return, there, which every
veRL consumer masks out: ``agg_loss``, ``masked_mean``, the metrics); the REINFORCE++ whitening over fewer
than two response tokens gives 0 where veRL's ``masked_var`` raises.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fastrlhf import ops
from fastrlhf.compat._patching import PatchHandle, Target, apply, unpatch_all
from fastrlhf.ops import reference
from fastrlhf.ops._common import check_discount
from fastrlhf.ops._validation import (
    FLOAT_DTYPES,
    check_finite,
    check_mask,
    check_same_device,
    check_same_shape,
    check_tensor,
)
from fastrlhf.ops.group_advantages import check_finite_scores

__all__ = [
    "compute_gae_advantage_return",
    "compute_grpo_outcome_advantage",
    "compute_reinforce_plus_plus_baseline_outcome_advantage",
    "compute_reinforce_plus_plus_outcome_advantage",
    "compute_rloo_outcome_advantage",
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


def compute_grpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO: each response's score against its group, ``(r - mean) / (std + epsilon)`` (unbiased std), or
    ``r - mean`` when ``norm_adv_by_std_in_grpo`` is False (Dr. GRPO), at every response token.

    Args:
        token_level_rewards: ``[B, T]`` floating; a row's score is its sum. response_mask: ``[B, T]`` 0/1.
        index: ``[B]`` prompt ids (numpy array, list or tensor): rows with equal ids form a group.
        config: unused (veRL's signature).
    Returns:
        ``(advantages, returns)``: one ``[B, T]`` tensor twice, 0 at masked positions.
    """
    return _grouped_outcome(
        "grpo", token_level_rewards, response_mask, index, epsilon, norm_adv_by_std_in_grpo
    )


def compute_rloo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index,
    epsilon: float = 1e-6,
    config=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO: each score minus the mean of the other responses to its prompt; a group of one keeps its
    score. Args and returns as ``compute_grpo_outcome_advantage``; epsilon, config and kwargs are unused."""
    return _grouped_outcome("rloo", token_level_rewards, response_mask, index, epsilon, True)


def compute_reinforce_plus_plus_baseline_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index,
    epsilon: float = 1e-6,
    config=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++-baseline: each score minus its group's mean at every response token, whitened over all
    response tokens of the batch. Args and returns as ``compute_grpo_outcome_advantage``."""
    return _grouped_outcome("reinforce++-baseline", token_level_rewards, response_mask, index, epsilon, True)


def compute_reinforce_plus_plus_outcome_advantage(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, config=None, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++: discounted returns of the token rewards, and the advantages as those returns whitened
    over all response tokens of the batch.

    veRL's loop restarts the running return after every masked token. Three paths give its result:
    - every row's response is one contiguous run and only its last token has a reward (an outcome
      score): ``ops.group_advantages(..., "reinforce++")``;
    - contiguous runs with rewards elsewhere too (a KL penalty in the reward): ``ops.gae`` with zero values
      and λ = 1, which is the same recurrence there;
    - masks with holes: the recurrence itself, a loop over T vectorised over rows (slow, exact).

    Args:
        token_level_rewards: ``[B, T]`` floating. response_mask: ``[B, T]`` 0/1.
        config: ``gamma`` is read from it (attribute or key); 1.0 when config is None.
    Returns:
        ``(advantages, returns)``, ``[B, T]``, 0 at masked positions.
    """
    gamma = check_discount("config.gamma", _config_value(config, "gamma", 1.0))
    mask_u8 = _check_token_inputs(token_level_rewards, response_mask)
    valid = mask_u8.bool()
    dtype = reference.compute_dtype(token_level_rewards)
    with torch.no_grad():
        if valid.numel() == 0:
            empty = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
            return empty, empty.clone()
        length = valid.shape[1]
        positions = torch.arange(length, device=valid.device)
        # Each row's last valid position: the first set byte from the right (argmax takes the first
        # maximum); -1 for a row with none.
        last = length - 1 - mask_u8.flip(-1).argmax(-1)
        last = torch.where(valid.gather(1, last[:, None])[:, 0], last, -1)
        runs = valid[:, 0].long() + (valid[:, 1:] & ~valid[:, :-1]).sum(1)
        if bool((runs <= 1).all()):
            elsewhere = (token_level_rewards != 0) & valid & (positions != last[:, None])
            if not bool(elsewhere.any()):
                score = token_level_rewards.gather(1, last.clamp_min(0)[:, None])
                score = torch.where(last[:, None] >= 0, score, torch.zeros_like(score))
                out = ops.group_advantages(score, valid, "reinforce++", gamma=gamma)
                return out.advantages, out.returns
            zero_values = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
            _, returns = ops.gae(token_level_rewards, zero_values, valid, gamma, 1.0)
        else:
            returns = _restarting_returns(token_level_rewards, valid, gamma)
        return reference.masked_whiten(returns, valid), returns


def _check_token_inputs(token_level_rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` floating rewards and a matching 0/1 mask on one device; returns the mask as uint8."""
    check_tensor("token_level_rewards", token_level_rewards, FLOAT_DTYPES)
    if token_level_rewards.dim() != 2:
        raise ValueError(
            f"token_level_rewards must be 2-D [B, T], got shape {tuple(token_level_rewards.shape)}"
        )
    check_same_shape("token_level_rewards", token_level_rewards, response_mask=response_mask)
    check_same_device(token_level_rewards=token_level_rewards, response_mask=response_mask)
    return check_mask("response_mask", response_mask)


def _config_value(config, name: str, default):
    """``config.name`` (veRL's AlgoConfig, an OmegaConf node) or ``config[name]``, else ``default``."""
    if config is None:
        return default
    value = getattr(config, name, None)
    if value is None and isinstance(config, Mapping):
        value = config.get(name)
    return default if value is None else value


def _group_ids(index, n: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """veRL's ``index`` (any ids: strings, ints) → int64 ``[n]`` group ids numbered in order of first
    appearance, and the number of groups. Rows already grouped contiguously get ids 0, 0, ..., 1, 1, ..."""
    if isinstance(index, torch.Tensor):
        _, inverse = torch.unique(index.reshape(-1), return_inverse=True)
        inverse = inverse.cpu().numpy()
    else:
        keys = np.asarray(index)
        try:
            _, inverse = np.unique(keys.reshape(-1), return_inverse=True)
        except TypeError:  # ids numpy cannot sort (mixed types): number them by hand
            seen: dict = {}
            inverse = np.array([seen.setdefault(key, len(seen)) for key in keys.reshape(-1).tolist()])
    inverse = inverse.reshape(-1)
    if inverse.shape[0] != n:
        raise ValueError(f"index has {inverse.shape[0]} entries; expected {n}, one per row")
    n_groups = int(inverse.max()) + 1 if n else 0
    first = np.full(n_groups, n)
    np.minimum.at(first, inverse, np.arange(n))
    rank = np.empty(n_groups, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(n_groups)
    return torch.as_tensor(rank[inverse], device=device), n_groups


def _grouped_outcome(estimator, token_level_rewards, response_mask, index, epsilon, norm_by_std):
    """The grouped estimators on veRL's inputs. Equal group sizes: rows are permuted into ``[G, k]`` (no
    copy when the groups are already contiguous, as veRL's repeated batches are), run through
    ``ops.group_advantages`` and permuted back. Unequal sizes: the same arithmetic on segment sums
    (``reference.outcome_row_values``), vectorised torch."""
    mask_u8 = _check_token_inputs(token_level_rewards, response_mask)
    if not check_finite("epsilon", epsilon) >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    with torch.no_grad():
        scores = token_level_rewards.sum(-1)
        n = scores.shape[0]
        groups, n_groups = _group_ids(index, n, scores.device)
        sizes = torch.bincount(groups, minlength=n_groups)
        k = n // n_groups if n_groups else 1
        if n_groups and bool((sizes == k).all()) and (k >= 2 or estimator != "rloo"):
            order = torch.argsort(groups, stable=True)
            in_place = bool((order == torch.arange(n, device=order.device)).all())
            grouped_scores = scores if in_place else scores[order]
            grouped_mask = mask_u8 if in_place else mask_u8[order]
            out = ops.group_advantages(
                grouped_scores.view(n_groups, k),
                grouped_mask,
                estimator,
                eps=epsilon,
                norm_by_std=norm_by_std,
            )
            advantages = out.advantages
            if not in_place:
                advantages = torch.empty_like(advantages).index_copy_(0, order, advantages)
            return advantages, advantages
        check_finite_scores(scores)
        rows = reference.outcome_row_values(scores, estimator, epsilon, norm_by_std, groups, n_groups)
        values = reference.outcome_token_values(
            rows, mask_u8, estimator, dtype=reference.compute_dtype(scores)
        )
        advantages, _ = reference.whiten_outcome(values, mask_u8, estimator)
        return advantages, advantages


def _restarting_returns(token_level_rewards: torch.Tensor, valid: torch.Tensor, gamma: float) -> torch.Tensor:
    """veRL's REINFORCE++ recurrence as written: right to left, ``running = reward + gamma * running``,
    then reset to 0 after each masked token. 0 at masked positions."""
    rewards = token_level_rewards.to(reference.compute_dtype(token_level_rewards))
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    keep = valid.to(rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running * keep[:, t]
        running = running * keep[:, t]
    return returns


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
        Target(core, "compute_grpo_outcome_advantage", compute_grpo_outcome_advantage),
        Target(core, "compute_rloo_outcome_advantage", compute_rloo_outcome_advantage),
        Target(
            core,
            "compute_reinforce_plus_plus_outcome_advantage",
            compute_reinforce_plus_plus_outcome_advantage,
        ),
        # newer veRL only
        Target(
            core,
            "compute_reinforce_plus_plus_baseline_outcome_advantage",
            compute_reinforce_plus_plus_baseline_outcome_advantage,
            optional=True,
        ),
    ]


def patch() -> PatchHandle:
    """Make the installed veRL call fastrlhf's kernels.

    Swaps ``verl.utils.torch_functional.logprobs_from_logits`` and ``verl.trainer.ppo.core_algos``'s
    ``compute_gae_advantage_return``, ``kl_penalty`` (and ``kl_penalty_forward``) and the outcome estimators
    ``compute_grpo_outcome_advantage``, ``compute_rloo_outcome_advantage``,
    ``compute_reinforce_plus_plus_outcome_advantage`` (and ``..._baseline_outcome_advantage``), plus every
    copy of them in loaded ``verl.*`` modules and registries (``ADV_ESTIMATOR_REGISTRY`` under "gae",
    "grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"). Returns a handle whose
    ``unpatch()`` (or ``with patch(): ...``) restores veRL. Without veRL it warns and does nothing.
    """
    return apply("verl", "verl", _targets())


def unpatch() -> None:
    """Undo every active ``patch()`` of veRL."""
    unpatch_all("verl")
