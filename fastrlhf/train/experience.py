"""Experience: what the update needs to know about a rollout, computed once before it.

Per response token: the log-prob of the sampled token under the policy that sampled it ("old") and under
the frozen reference (the SFT policy), both under the distribution that was sampled (the softmax at the
rollout's temperature), and the critic's value (GAE only). Then the advantages, by estimator:

- ``gae`` (InstructGPT's PPO): token reward ``-β·KL_t``, plus the normalised score at the last token; GAE
  over the critic's values; whitened advantages; the returns are the critic's targets
  (``ops.compute_advantages``).
- ``grpo`` / ``rloo`` / ``reinforce++`` / ``reinforce++-baseline`` (critic-free): each response's
  normalised score, minus ``β·Σ_t KL_t`` when the penalty sits in the reward, compared within the ``k``
  samples of its prompt (``ops.group_advantages``).

With ``kl_penalty="loss"`` the reward carries no KL term; the update adds ``β·KL`` to the loss instead.

**On-policy experience** (``PPOConfig.single_update_per_rollout``: one epoch over one minibatch). The old
log-probs come from no separate pass: the ratio's π_old is the update's own forward, detached
(``ops.linear_ppo_policy_loss(old_logprobs=None)``), exact by construction, and the KL penalty takes the
sampler's log-probs of the tokens, which equal a full forward's to float rounding (the logged
``rollout/logprob_gap_*``). That saves one policy forward over every response token, the lm_head GEMM
included: about a sixth of a CPU step at V=32000.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from fastrlhf import ops
from fastrlhf.models.eval_mode import evaluating
from fastrlhf.train.rollout import Rollout, micro_batches, select_rows

if TYPE_CHECKING:
    from fastrlhf.train.ppo import PPOConfig
    from fastrlhf.train.rewards import ScoreNormalizer

ESTIMATORS = ("gae", "grpo", "rloo", "reinforce++", "reinforce++-baseline")
KL_PLACEMENTS = ("reward", "loss")
OLD_LOGPROB_SOURCES = ("auto", "recompute")


@dataclasses.dataclass
class Experience:
    """One rollout's experience. ``[B, T]`` tensors on the rollout's layout, 0 off the response mask."""

    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    advantages: torch.Tensor
    values: torch.Tensor | None  # the critic's values at rollout time (GAE only)
    returns: torch.Tensor | None  # the critic's targets (GAE only)
    scores: torch.Tensor  # [B] the scores optimised: normalised, clipped, EOS-penalised
    kl: torch.Tensor  # [B] Σ_t (old - ref): the sampled responses' KL to the reference, in nats
    # True: old_logprobs are the sampler's, and the update takes π_old from its own forward.
    on_policy: bool = False

    def rows(self, index: torch.Tensor) -> dict:
        """The per-token tensors of rows ``index``, as the update's micro-batch reads them."""
        picked = {
            "old_logprobs": self.old_logprobs[index],
            "ref_logprobs": self.ref_logprobs[index],
            "advantages": self.advantages[index],
        }
        if self.values is not None:
            picked.update(old_values=self.values[index], returns=self.returns[index])
        return picked


@torch.no_grad()
def rollout_logprobs(
    model,
    rollout: Rollout,
    micro_batch_rows: int,
    temperature: float,
    with_values: bool,
    with_old: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """``(old_logprobs or None, ref_logprobs, values or None)``, each ``[B, T]``, in eval mode (no dropout).

    ``model`` is the unwrapped ``ActorCritic``. The passes run in the same row blocks as the first update
    epoch (see ``select_rows``), so that epoch's ratio is exactly 1. ``with_old=False`` skips the policy's
    log-probs (the policy trunk still runs when it also gives the values).
    """
    shape, device = rollout.mask.shape, rollout.mask.device
    old_logprobs = torch.zeros(shape, device=device) if with_old else None
    ref_logprobs = torch.zeros(shape, device=device)
    values = torch.zeros(shape, device=device) if with_values else None
    with evaluating(model):
        for rows in micro_batches(torch.arange(shape[0], device=device), micro_batch_rows):
            micro = select_rows(rollout, rows)
            keep, targets = micro["mask"], micro["targets"]
            passes = []
            value = None
            if with_old:
                hidden, value = model(value_rows=None if with_values else 0, **micro["inputs"])
                passes.append((old_logprobs, hidden, model.lm_head))
            elif with_values and model.mode == "separate":  # the values alone, without the policy's pass
                value = model.critic_values(**micro["inputs"])
            elif with_values:
                _, value = model(**micro["inputs"])
            ref_hidden, ref_head = model.reference_hidden(**micro["inputs"])
            passes.append((ref_logprobs, ref_hidden, ref_head))
            for out, states, head in passes:
                block = torch.zeros(rows.numel(), shape[1], device=device)
                block[keep] = ops.linear_logprobs(
                    states[keep], head.weight, targets[keep], bias=head.bias, temperature=temperature
                )
                out[rows] = block
            if values is not None:
                values[rows] = torch.where(keep, value.float(), 0.0)
    return old_logprobs, ref_logprobs, values


@torch.no_grad()
def make_experience(
    model, rollout: Rollout, config: PPOConfig, kl_coef: float, normalizer: ScoreNormalizer
) -> Experience:
    """Log-probs, values and advantages of ``rollout``. ``normalizer`` has already seen its scores."""
    with_critic = config.advantage_estimator == "gae"
    on_policy = config.single_update_per_rollout and rollout.sampled_logprobs is not None
    old, ref, values = rollout_logprobs(
        model,
        rollout,
        config.micro_batch_size,
        config.temperature,
        with_values=with_critic,
        with_old=not on_policy,
    )
    mask = rollout.mask
    if on_policy:
        old = torch.zeros_like(ref)
        old[mask] = rollout.sampled_logprobs.to(old.dtype)
    scores = normalizer(rollout.scores)
    if config.score_clip:
        scores = scores.clamp(-config.score_clip, config.score_clip)
    if config.missing_eos_penalty:
        # The "EOS trick", on the normalised scale: a response cut off by max_new_tokens scores lower than
        # any that finished, which stops the policy from rambling into text the reward model misjudges.
        scores = scores - config.missing_eos_penalty * (~rollout.ended_with_eos).float()
    reward_kl_coef = kl_coef if config.kl_penalty == "reward" else 0.0
    sequence_kl = ops.kl_penalty(old, ref, mask, estimator="k1").sum(1)
    if with_critic:
        result = ops.compute_advantages(
            scores,
            old,
            ref,
            values,
            mask,
            kl_coef=reward_kl_coef,
            estimator=config.kl_estimator,
            gamma=config.gamma,
            lam=config.lam,
            whiten=config.whiten_advantages,
        )
        advantages, returns = result.advantages, result.returns
    else:
        penalised = scores
        if reward_kl_coef:
            penalised = scores - reward_kl_coef * ops.kl_penalty(
                old, ref, mask, estimator=config.kl_estimator
            ).sum(1)
        k = rollout.samples_per_prompt
        result = ops.group_advantages(
            penalised.view(-1, k),
            mask,
            config.advantage_estimator,
            gamma=config.gamma,
            norm_by_std=config.norm_by_std,
        )
        advantages, returns = result.advantages, None
    return Experience(old, ref, advantages, values, returns, scores, sequence_kl, on_policy)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var(returns - values) / Var(returns)`` over the masked tokens: 1 for a perfect critic, 0 for
    one that predicts only the mean, negative for one worse than that."""
    keep = mask.bool()
    target, error = returns[keep].double(), (returns - values)[keep].double()
    if target.numel() < 2:
        return float("nan")
    variance = target.var()
    return float(1.0 - error.var() / variance) if variance > 0 else float("nan")
