"""Independent, deliberately plain re-statements of the peers' loops and of the ranking loss, used as
references that share no code with fastrlhf.ops."""

from __future__ import annotations

import itertools

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
