"""Independent, deliberately plain re-statements of the peers' loops and of the ranking loss, used as
references that share no code with fastrlhf.ops."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F


def gae_mask_carry_loop(rewards, values, mask, gamma, lam):
    """veRL's loop (verl/trainer/ppo/core_algos.py, compute_gae_advantage_return, the version that carries
    nextvalues and lastgaelam across masked steps), on Python floats."""
    out_adv, out_ret = [], []
    for r, v, m in zip(rewards.tolist(), values.tolist(), mask.bool().tolist(), strict=True):
        next_v, last, adv = 0.0, 0.0, [0.0] * len(r)
        for t in reversed(range(len(r))):
            if m[t]:
                delta = r[t] + gamma * next_v - v[t]
                last = delta + gamma * lam * last
                adv[t] = last
                next_v = v[t]
        out_adv.append(adv)
        out_ret.append([a + vv if mm else 0.0 for a, vv, mm in zip(adv, v, m, strict=True)])
    shape = rewards.shape
    return (
        torch.tensor(out_adv, dtype=torch.float64).reshape(shape),
        torch.tensor(out_ret, dtype=torch.float64).reshape(shape),
    )


def gae_right_padded_loop(rewards, values, length, gamma, lam):
    """TRL's / OpenRLHF's loop over one row's valid prefix (next value 0 past the end), on Python floats."""
    adv = [0.0] * len(rewards)
    last = 0.0
    for t in reversed(range(length)):
        next_v = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv


def ranking_loss_by_enumeration(rewards, ranks, mask, margin):
    """Enumerate every pair with itertools, one float64 autograd scalar per pair: (loss, accuracy, skipped).

    ``rewards`` may require grad; the loss is differentiable through it.
    """
    prompt_losses, prompt_accs, skipped = [], [], 0
    n, k = rewards.shape
    for i in range(n):
        valid = [j for j in range(k) if mask is None or bool(mask[i, j])]
        pairs = []
        for a, b in itertools.combinations(valid, 2):
            if ranks[i, a] == ranks[i, b]:
                continue
            pairs.append((a, b) if ranks[i, a] < ranks[i, b] else (b, a))
        if not pairs:
            skipped += 1
            continue
        terms = [-F.logsigmoid(rewards[i, w] - rewards[i, lose] - margin) for w, lose in pairs]
        prompt_losses.append(torch.stack(terms).mean())
        prompt_accs.append(sum(float(rewards[i, w] > rewards[i, lose]) for w, lose in pairs) / len(pairs))
    if not prompt_losses:
        return rewards.sum() * 0, 0.0, skipped
    return torch.stack(prompt_losses).mean(), sum(prompt_accs) / len(prompt_accs), skipped


def eager_logprobs_from_hidden(hidden, weight, labels, bias=None, temperature=1.0, ignore_index=-100):
    """``hidden @ weight.T + bias → log_softmax → gather`` in the inputs' dtype, the way an eager trainer
    writes it, with the entropy of each position: (logprobs, entropy), 0 where the label is ignored."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    valid = labels != ignore_index
    picked = logp_all.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    zero = torch.zeros_like(picked)
    return torch.where(valid, picked, zero), torch.where(valid, entropy, zero)


def kl_estimate(logp, ref, estimator):
    """The four per-token KL estimators written out (Schulman's k1/k2/k3, and |d|)."""
    diff = logp - ref
    if estimator == "k1":
        return diff
    if estimator == "k2":
        return 0.5 * diff * diff
    if estimator == "k3":
        return torch.exp(ref - logp) - (ref - logp) - 1
    return diff.abs()


def eager_ppo_policy_loss(
    logp,
    old,
    adv,
    mask,
    clip_low,
    clip_high,
    dual_clip=None,
    ref=None,
    kl_coef=0.0,
    estimator="k3",
    entropy=None,
    entropy_coef=0.0,
    loss_agg="token-mean",
):
    """A re-statement of veRL's compute_policy_loss + agg_loss (verl/trainer/ppo/core_algos.py) with the
    KL-in-loss and entropy-bonus terms of its actor (verl/workers/actor/dp_actor.py, update_policy):
    returns (loss, clip_fraction, approx_kl as mean((r-1) - log r))."""
    m = mask.to(logp.dtype)
    log_ratio = (logp - old).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    loss1 = -adv * ratio
    loss2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clipped_max = torch.maximum(loss1, loss2)
    per_token = clipped_max
    if dual_clip is not None:
        per_token = torch.where(adv < 0, torch.minimum(-adv * dual_clip, clipped_max), clipped_max)
    if ref is not None and kl_coef:
        per_token = per_token + kl_coef * kl_estimate(logp, ref, estimator)
    if entropy is not None and entropy_coef:
        per_token = per_token - entropy_coef * entropy
    per_token = per_token * m
    if loss_agg == "token-mean":
        loss = per_token.sum() / m.sum()
    else:
        lengths = m.sum(-1)
        keep = lengths > 0
        loss = (per_token.sum(-1)[keep] / lengths[keep]).mean()
    clip_fraction = ((loss2 > loss1).to(m.dtype) * m).sum() / m.sum()
    approx_kl = (((ratio - 1) - log_ratio) * m).sum() / m.sum()
    return loss, clip_fraction, approx_kl


def eager_value_loss(values, old_values, returns, mask, clip):
    """OpenRLHF's ValueLoss (openrlhf/models/loss.py) restated: 0.5·max of the two squared errors,
    token mean; (loss, clip_fraction)."""
    m = mask.to(values.dtype)
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    surr1 = (clipped - returns) ** 2
    surr2 = (values - returns) ** 2
    loss = 0.5 * (torch.max(surr1, surr2) * m).sum() / m.sum()
    return loss, ((surr1 > surr2).to(m.dtype) * m).sum() / m.sum()


# ------------------------------------------------------------------------------- outcome advantages


def group_advantages_loop(scores, mask, estimator, gamma=1.0, eps=1e-6, norm_by_std=True):
    """fastrlhf's group_advantages on Python floats, one group, one response, one token at a time.

    scores: ``[B, k]``; mask: ``[B, k, T]`` or ``[B*k, T]``. Returns float64 ``(advantages, returns)``
    ``[B*k, T]``. A group of one has mean 0 and std 1; REINFORCE++ discounts over the valid tokens only
    (holes skipped); whitening over fewer than 2 valid tokens gives 0.
    """
    groups = scores.double().tolist()
    length = mask.shape[-1]
    rows_mask = mask.reshape(len(groups) * scores.shape[1], length).bool().tolist()
    values = []
    for group in groups:
        k = len(group)
        total = math.fsum(group)
        mean = total / k if k > 1 else 0.0
        std = math.sqrt(math.fsum((r - mean) ** 2 for r in group) / (k - 1)) if k > 1 else 1.0
        for r in group:
            if estimator == "reinforce++":
                values.append(r)
            elif estimator == "rloo":
                values.append(r - (total - r) / (k - 1))
            elif estimator == "grpo" and norm_by_std:
                values.append((r - mean) / (std + eps) if std + eps > 0 else 0.0)
            else:
                values.append(r - mean)
    out = []
    for value, row_mask in zip(values, rows_mask, strict=True):
        row = [0.0] * length
        discount = 1.0
        for t in reversed(range(length)):
            if row_mask[t]:
                if estimator == "reinforce++":
                    row[t] = value * discount
                    discount *= gamma
                else:
                    row[t] = value
        out.append(row)
    if estimator in ("reinforce++", "reinforce++-baseline"):
        picked = [x for row, m in zip(out, rows_mask, strict=True) for x, v in zip(row, m, strict=True) if v]
        whitened = [[0.0] * length for _ in out]
        if len(picked) >= 2:
            mean = math.fsum(picked) / len(picked)
            var = math.fsum((x - mean) ** 2 for x in picked) / (len(picked) - 1)
            scale = 1.0 / math.sqrt(var + 1e-8)
            whitened = [
                [(x - mean) * scale if v else 0.0 for x, v in zip(row, m, strict=True)]
                for row, m in zip(out, rows_mask, strict=True)
            ]
        advantages, returns = whitened, (out if estimator == "reinforce++" else whitened)
    else:
        advantages = returns = out
    shape = (len(out), length)
    return (
        torch.tensor(advantages, dtype=torch.float64).reshape(shape),
        torch.tensor(returns, dtype=torch.float64).reshape(shape),
    )


# veRL's outcome estimators, restated from verl/trainer/ppo/core_algos.py (compute_grpo_outcome_advantage,
# compute_rloo_outcome_advantage, compute_reinforce_plus_plus_outcome_advantage,
# compute_reinforce_plus_plus_baseline_outcome_advantage) and verl/utils/torch_functional.py
# (masked_whiten). Each row's score is the sum of its token rewards; rows sharing an ``index`` value form
# a group, in any order and of any size. They compute in the rewards' dtype.


def verl_masked_whiten(values, mask):
    """verl/utils/torch_functional.py, masked_whiten (with masked_mean's ``+ 1e-8`` denominator and
    masked_var's Bessel correction), shift_mean=True."""
    mask = mask.to(values.dtype)

    def masked_mean(v):
        return (torch.where(mask.bool(), v, 0.0) * mask).sum() / (mask.sum() + 1e-8)

    mean = masked_mean(values)
    var = masked_mean((values - mean) ** 2) * mask.sum() / (mask.sum() - 1)
    return (values - mean) * torch.rsqrt(var + 1e-8)


def _verl_groups(index):
    """Row positions per distinct index value, in first-seen order."""
    keys = index.tolist() if hasattr(index, "tolist") else list(index)
    members: dict = {}
    for row, key in enumerate(keys):
        members.setdefault(key, []).append(row)
    return list(members.values())


def verl_grpo(token_level_rewards, response_mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True):
    """GRPO: a group of one is scored against mean 0 and std 1; a larger group against torch.mean and the
    unbiased torch.std of its scores; the division by ``std + epsilon`` is dropped when
    norm_adv_by_std_in_grpo is False. The row's value times the response mask, returned twice."""
    scores = token_level_rewards.sum(-1)
    value = scores.clone()
    for rows in _verl_groups(index):
        group = scores[rows]
        if len(rows) == 1:
            mean, std = torch.tensor(0.0, dtype=scores.dtype), torch.tensor(1.0, dtype=scores.dtype)
        else:
            mean, std = group.mean(), group.std()
        value[rows] = (group - mean) / (std + epsilon) if norm_adv_by_std_in_grpo else group - mean
    advantages = value[:, None] * response_mask
    return advantages, advantages


def verl_rloo(token_level_rewards, response_mask, index):
    """RLOO: in a group of n > 1, ``r·n/(n-1) - mean·n/(n-1)``; a group of one keeps its score."""
    scores = token_level_rewards.sum(-1)
    value = scores.clone()
    for rows in _verl_groups(index):
        n = len(rows)
        if n > 1:
            group = scores[rows]
            value[rows] = group * n / (n - 1) - group.mean() * n / (n - 1)
    advantages = value[:, None] * response_mask
    return advantages, advantages


def verl_reinforce_pp(token_level_rewards, response_mask, gamma):
    """REINFORCE++: right to left, ``running = reward[t] + gamma·running``, stored as returns[t], then
    multiplied by mask[t] (so a masked token restarts the sum); advantages are the returns whitened over
    the mask, times the mask. Returns are not masked."""
    returns = torch.zeros_like(token_level_rewards)
    running = torch.zeros_like(token_level_rewards[:, 0])
    mask = response_mask.to(token_level_rewards.dtype)
    for t in reversed(range(token_level_rewards.shape[1])):
        running = token_level_rewards[:, t] + gamma * running
        returns[:, t] = running
        running = running * mask[:, t]
    return verl_masked_whiten(returns, response_mask) * mask, returns


def verl_reinforce_pp_baseline(token_level_rewards, response_mask, index):
    """REINFORCE++-baseline: the score minus its group's mean (0 for a group of one), tiled over the
    tokens, times the mask, whitened over the mask, times the mask again; returned twice."""
    scores = token_level_rewards.sum(-1)
    value = scores.clone()
    for rows in _verl_groups(index):
        if len(rows) > 1:
            value[rows] = scores[rows] - scores[rows].mean()
    mask = response_mask.to(token_level_rewards.dtype)
    tiled = value[:, None].expand_as(token_level_rewards) * mask
    advantages = verl_masked_whiten(tiled, response_mask) * mask
    return advantages, advantages
