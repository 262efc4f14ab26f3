"""Plain-torch definitions of every fastrlhf op: the spec the kernels are tested against.

These are written for clarity and exactness, not speed. They are also the ``"torch"`` backend, so they
must be differentiable wherever the op has gradients. Float64 inputs compute in float64 (that is how the
tests build their reference); every other floating dtype computes and returns float32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 stays float64; fp32 / bf16 / fp16 accumulate in float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------
# log-probabilities
# ----------------------------------------------------------------------------------------------------


def gather_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """Log-probability of each label under ``softmax(logits / temperature)``.

    Args:
        logits: ``[..., V]`` float32 / bfloat16 / float16 / float64.
        labels: ``[...]`` integer; ``ignore_index`` marks positions to skip.
    Returns:
        ``logprobs[...]`` (float32, or float64 for float64 input), 0 where the label is ``ignore_index``;
        with ``return_entropy`` also ``entropy[...]``, the entropy of the tempered distribution
        (0 at ignored positions).
    """
    z = logits.to(compute_dtype(logits)) / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logprobs = logp_all.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    logprobs = torch.where(valid, logprobs, torch.zeros_like(logprobs))
    if not return_entropy:
        return logprobs
    probs = logp_all.exp()
    # p·log p is 0 where p is 0 (e.g. -inf logits); the guard keeps the value and its gradient finite.
    logp_where_positive = torch.where(probs > 0, logp_all, torch.zeros_like(logp_all))
    entropy = -(probs * logp_where_positive).sum(-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logprobs, entropy


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """``gather_logprobs(hidden @ weight.T + bias, labels)``, with the product accumulated in fp32.

    Args:
        hidden: ``[N, H]``; weight: ``[V, H]``; bias: ``[V]`` or None; labels: ``[N]``.
    """
    dtype = compute_dtype(hidden)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    return gather_logprobs(logits, labels, temperature, ignore_index, return_entropy)


# ----------------------------------------------------------------------------------------------------
# KL penalty
# ----------------------------------------------------------------------------------------------------

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    estimator: str = "k1",
    clamp: float | None = None,
):
    """Per-token KL estimate between the policy and the reference.

    With ``d = logprobs - ref_logprobs``: ``k1 = d``, ``k2 = d²/2``, ``k3 = exp(-d) + d - 1``,
    ``abs = |d|``. ``clamp`` bounds the estimate to ``[-clamp, clamp]``. Masked positions give 0.

    Args:
        logprobs, ref_logprobs: ``[B, T]`` (any matching shape). mask: same shape, 0/1, or None.
    Returns:
        ``[B, T]`` float32 (float64 for float64 input).
    """
    dtype = compute_dtype(logprobs)
    diff = logprobs.to(dtype) - ref_logprobs.to(dtype)
    if estimator == "k1":
        kl = diff
    elif estimator == "k2":
        kl = 0.5 * diff.square()
    elif estimator == "k3":
        # exp(-d) - (-d) - 1 written with expm1 so small gaps keep their precision.
        gap = -diff
        if clamp is not None:
            # Past x = c + 1, k3 = e^x - x - 1 > c already, so capping the gap there changes no value; it
            # keeps exp finite, so a -inf log-prob gives the clamp and a zero gradient rather than NaN
            # (inf - inf, and the clamp's 0 gradient times inf). 80 keeps e^x inside float32.
            gap = gap.clamp(max=min(clamp + 1.0, 80.0))
        kl = torch.expm1(gap) - gap
    elif estimator == "abs":
        kl = diff.abs()
    else:
        raise ValueError(f"estimator={estimator!r} is not one of {KL_ESTIMATORS}")
    if clamp is not None:
        kl = kl.clamp(-clamp, clamp)
    if mask is not None:
        kl = torch.where(mask.bool(), kl, torch.zeros_like(kl))
    return kl


# ----------------------------------------------------------------------------------------------------
# masked statistics and GAE
# ----------------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is set (all of them when ``dim`` is None)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` over the masked positions, with the unbiased variance.

    ``shift_mean=False`` adds the mean back (scales only). Unmasked positions give 0, whatever they hold.

    The mean, the centring and the variance run in float64: x up to fp32's max whitens without overflow,
    long batches lose no precision, and a constant input gives exactly 0 (its mean is exact). Fewer than
    two set positions leave no spread to estimate: the variance is taken as 0, so the result is 0 (with
    ``shift_mean=False``, the one set position keeps its value), with finite gradients. This is the one
    home of that rule: ``group_advantages`` whitens through it on every backend. (``ops.masked_whiten``
    raises there instead, as veRL does.)
    """
    valid = mask.bool()
    count = torch.count_nonzero(valid).to(torch.float64)
    # Centred in float64 too: x - mean of fp32 values near fp32's max (3e38 against a mean of -1e38)
    # overflows to inf in fp32, and inf * rsqrt(inf) is NaN. The whitened values are small again.
    x64 = x.to(torch.float64)
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    mean = torch.where(valid, x64, zero).sum() / count.clamp_min(1)
    centered = torch.where(valid, x64 - mean, zero)
    var = torch.linalg.vector_norm(centered).square() / (count - 1).clamp_min(1)
    # 1e-8 keeps a constant input finite, the same epsilon TRL, OpenRLHF and veRL use.
    whitened = centered * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = torch.where(valid, whitened + mean, zero)
    return whitened.to(x.dtype)


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation with mask-carry semantics (veRL's).

    Walk t from T-1 down to 0. Where ``mask[t]`` is set: ``δ = r[t] + γ·next_v − v[t]``,
    ``last = δ + γλ·last``, ``adv[t] = last``, ``next_v = v[t]``. Elsewhere ``next_v`` and ``last`` carry
    over unchanged and ``adv[t] = 0``. On right-padded masks this equals TRL's and OpenRLHF's loops.

    Args:
        rewards, values, mask: ``[B, T]``.
    Returns:
        ``(advantages[B, T], returns[B, T])``; ``returns = advantages + values`` where the mask is set,
        0 elsewhere. No gradient.
    """
    dtype = compute_dtype(values)
    rewards, values = rewards.to(dtype), values.to(dtype)
    valid = mask.bool()
    batch, length = values.shape
    advantages = torch.zeros_like(values)
    next_value = torch.zeros(batch, dtype=dtype, device=values.device)
    last = torch.zeros(batch, dtype=dtype, device=values.device)
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        step = delta + gamma * lam * last
        last = torch.where(valid[:, t], step, last)
        next_value = torch.where(valid[:, t], values[:, t], next_value)
        advantages[:, t] = torch.where(valid[:, t], step, torch.zeros_like(step))
    returns = torch.where(valid, advantages + values, torch.zeros_like(values))
    return advantages, returns


# ----------------------------------------------------------------------------------------------------
# outcome advantages of critic-free RL (GRPO, RLOO, REINFORCE++)
# ----------------------------------------------------------------------------------------------------

OUTCOME_ESTIMATORS = ("grpo", "rloo", "reinforce++", "reinforce++-baseline")


def outcome_row_values(
    scores: torch.Tensor,
    estimator: str,
    eps: float = 1e-6,
    norm_by_std: bool = True,
    groups: torch.Tensor | None = None,
    n_groups: int = 0,
) -> torch.Tensor:
    """Each response's outcome value before it is spread over tokens, in float64.

    Per group, with ``d = r - mean`` and the unbiased ``std``: grpo ``d / (std + eps)`` (0 where
    ``std + eps == 0``), or ``d`` without ``norm_by_std``; rloo ``d·n/(n-1)``, the score minus the mean of
    the others; reinforce++-baseline ``d``; reinforce++ the score itself. A group of one follows veRL: mean
    0 and std 1, and rloo leaves its score unchanged. The statistics run in float64 (B·k numbers), and
    the scores are shifted by each group's first one before summing, so an all-equal group gives exactly
    0 and fp32 scores up to 3.4e38 never overflow the variance.

    Args:
        scores: ``[B, k]``, a group per row; or ``[N]`` with ``groups``, ``[N]`` int64 ids in
            ``[0, n_groups)`` in any order and of any sizes (veRL's ``index``, as segment sums).
    Returns:
        float64, shaped like ``scores``.
    """
    s = scores.to(torch.float64)
    if estimator == "reinforce++" or s.numel() == 0:
        return s
    if groups is None:
        shifted = s - s[:, :1]
        dev = shifted - shifted.mean(1, keepdim=True)
        size = torch.full_like(s, s.shape[1])
        var = dev.square().sum(1, keepdim=True) / max(s.shape[1] - 1, 1)
        std = var.sqrt().expand_as(s)
    else:
        count = torch.zeros(n_groups, dtype=torch.float64, device=s.device).index_add_(
            0, groups, torch.ones_like(s)
        )
        positions = torch.arange(s.shape[0], device=s.device)
        first = torch.full((n_groups,), s.shape[0], device=s.device)
        first = first.scatter_reduce_(0, groups, positions, "amin")
        pivot = s[first.clamp_max(s.shape[0] - 1)]  # an id with no response never gathers its pivot
        shifted = s - pivot[groups]
        mean_shifted = torch.zeros_like(count).index_add_(0, groups, shifted) / count.clamp_min(1)
        dev = shifted - mean_shifted[groups]
        size = count[groups]
        var = torch.zeros_like(count).index_add_(0, groups, dev.square()) / (count - 1).clamp_min(1)
        std = var.sqrt()[groups]
    single = size == 1
    if estimator == "rloo":
        return torch.where(single, s, dev * size / (size - 1).clamp_min(1))
    centered = torch.where(single, s, dev)
    if estimator == "grpo" and norm_by_std:
        denom = torch.where(single, torch.ones_like(s), std) + eps
        return torch.where(denom > 0, centered / torch.where(denom > 0, denom, 1.0), 0.0)
    return centered


def outcome_token_values(
    row_values: torch.Tensor,
    mask: torch.Tensor,
    estimator: str,
    gamma: float = 1.0,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Spread each row's value over its valid tokens: ``[N]`` and mask ``[N, T]`` → ``[N, T]`` of ``dtype``
    (default: the values' dtype), 0 elsewhere.

    reinforce++ places the score at the row's last valid token and discounts it leftward over the valid
    tokens: ``value · γ^(valid tokens after t)``, computed in float64 (an fp32 γ would carry its rounding
    into every power). Masked tokens are skipped (the discount carries over them, like GAE's mask-carry);
    on right-padded rows this equals veRL's loop, which instead restarts the sum at every masked token.
    The other estimators broadcast the value unchanged.
    """
    dtype = dtype or row_values.dtype
    valid = mask.bool()
    if estimator == "reinforce++":
        flags = valid.to(torch.int64)
        after = flags.flip(-1).cumsum(-1).flip(-1) - flags
        discount = torch.pow(gamma, after.to(torch.float64))
        values = (row_values.to(torch.float64)[:, None] * discount).to(dtype)
    else:
        values = row_values.to(dtype)[:, None].expand(valid.shape)
    return torch.where(valid, values, torch.zeros((), dtype=dtype, device=values.device))


def whiten_outcome(values: torch.Tensor, mask: torch.Tensor, estimator: str):
    """``(advantages, returns)`` from the token values: the REINFORCE++ variants whiten them over every
    valid token of the batch (``masked_whiten``: 0 with fewer than 2); reinforce++ keeps the values as its
    returns, the others return the advantages themselves (the same tensor, as veRL)."""
    if estimator == "reinforce++":
        return masked_whiten(values, mask), values
    if estimator == "reinforce++-baseline":
        advantages = masked_whiten(values, mask)
        return advantages, advantages
    return values, values


@torch.no_grad()
def group_advantages(
    scores: torch.Tensor,
    response_mask: torch.Tensor,
    estimator: str = "grpo",
    gamma: float = 1.0,
    eps: float = 1e-6,
    norm_by_std: bool = True,
):
    """Outcome advantages of k responses per prompt, broadcast to every valid response token.

    ``outcome_row_values`` per response, ``outcome_token_values`` over its tokens (in float64, then the
    compute dtype), and ``whiten_outcome``. Rows of a group are contiguous: response j of prompt i is row
    ``i*k + j``.

    Args:
        scores: ``[B, k]``. response_mask: ``[B, k, T]`` or ``[B*k, T]``, 0/1 or bool.
    Returns:
        ``(advantages, returns)``, shaped like ``response_mask``, 0 at masked positions. No gradient.
    """
    dtype = compute_dtype(scores)
    batch, k = scores.shape
    mask = response_mask.reshape(batch * k, response_mask.shape[-1]).bool()
    rows = outcome_row_values(scores, estimator, eps, norm_by_std).reshape(-1)
    values = outcome_token_values(rows, mask, estimator, gamma, dtype)
    shape = response_mask.shape
    return whiten_outcome(values.view(shape), mask.view(shape), estimator)


# ----------------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------------


class SampleResult(NamedTuple):
    """``tokens`` int64 ``[B]``; ``logprobs`` ``[B]``, each token's log-prob under the distribution it was
    drawn from (after temperature and truncation); ``entropy`` ``[B]`` of that distribution, or None."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor | None


@torch.no_grad()
def truncated_support(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ``sample`` draws from: ``t = z - max z`` ``[B, V]``, the kept set ``[B, V]`` bool, and ``bad``
    ``[B]`` (rows with NaN or +inf, or only -inf; their t is 0). The probabilities are ``softmax`` of t
    over the kept set. Rules: see ``sample``."""
    dtype = compute_dtype(logits)
    z = logits.to(dtype) / temperature
    batch, vocab = z.shape
    bad = torch.isnan(z).any(-1) | (z == torch.inf).any(-1) | (z == -torch.inf).all(-1)
    z = torch.where(bad[:, None], torch.zeros_like(z), z)
    t = z - z.amax(-1, keepdim=True)
    e = t.exp()
    tau = torch.zeros(batch, 1, dtype=dtype, device=z.device)
    if 0 < top_k < vocab:
        tau = e.topk(top_k, dim=-1).values[:, -1:]
    if top_p < 1.0:
        ranked = torch.where(e >= tau, e, 0.0).sort(-1, descending=True).values
        mass = ranked.cumsum(-1)
        # The first rank whose running mass reaches top_p of the total; its value is the threshold.
        first = (mass < top_p * mass[:, -1:]).sum(-1, keepdim=True).clamp_max(vocab - 1)
        tau = torch.maximum(tau, ranked.gather(-1, first))
    if min_p > 0.0:
        tau = tau.clamp_min(min_p)
    return t, (e >= tau) & (e > 0), bad


@torch.no_grad()
def sample(
    logits: torch.Tensor,
    uniforms: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    return_entropy: bool = False,
) -> SampleResult:
    """One token per row of ``softmax(logits / temperature)`` truncated by top-k, top-p and min-p, drawn by
    the inverse CDF at ``uniforms``: a deterministic function of ``(logits, uniforms)``.

    With ``e = exp(z - max z)``, ``z = logits / temperature``, the kept set is ``{e >= tau, e > 0}`` where
    tau is the largest of: the k-th largest e (``0 < top_k < V``; ties all kept); the largest e-value v
    whose kept-so-far mass ``sum_{e >= v} e`` reaches ``top_p`` of the top-k mass (``top_p < 1``); and
    ``min_p`` (e is p / p_max). The token is the first kept index whose running kept mass, in index order,
    exceeds ``u * S`` (S: the kept mass). A row with NaN or +inf, or only -inf, gets token -1 and NaN.

    Args:
        logits: ``[B, V]`` floating. uniforms: ``[B]`` in [0, 1).
    Returns:
        ``SampleResult``; logprobs / entropy float32 (float64 for float64 logits).
    """
    t, kept, bad = truncated_support(logits, temperature, top_k, top_p, min_p)
    dtype, vocab = t.dtype, t.shape[-1]
    e = t.exp()
    weights = torch.where(kept, e, 0.0)
    running = weights.cumsum(-1)
    total = running[:, -1]
    crossed = (running <= (uniforms.to(dtype) * total)[:, None]).sum(-1)
    last_kept = torch.where(kept, torch.arange(vocab, device=t.device), -1).amax(-1)
    tokens = torch.where(crossed < vocab, crossed, last_kept)
    log_total = total.log()
    logprobs = t.gather(-1, tokens[:, None]).squeeze(-1) - log_total
    entropy = None
    if return_entropy:
        entropy = log_total - torch.where(kept, weights * t, 0.0).sum(-1) / total
        entropy = torch.where(bad, torch.nan, entropy)
    tokens = torch.where(bad, -1, tokens)
    logprobs = torch.where(bad, torch.nan, logprobs)
    return SampleResult(tokens, logprobs, entropy)


# ----------------------------------------------------------------------------------------------------
# K-wise ranking loss
# ----------------------------------------------------------------------------------------------------


class RankingLossResult(NamedTuple):
    """``loss`` (scalar), ``accuracy`` (scalar, fraction of pairs with r_w > r_l, weighted like the loss),
    ``num_prompts_without_pairs`` (prompts with fewer than 2 valid responses or only ties)."""

    loss: torch.Tensor
    accuracy: torch.Tensor
    num_prompts_without_pairs: torch.Tensor


def ranking_loss(
    rewards: torch.Tensor,
    ranks: torch.Tensor,
    mask: torch.Tensor | None = None,
    margin: float = 0.0,
) -> RankingLossResult:
    """InstructGPT's K-wise pairwise ranking loss, all C(K,2) pairs of a prompt as one batch element.

    Rank 1 is best. Every valid pair with ``rank_w < rank_l`` contributes ``-logσ(r_w - r_l - margin)``;
    equal ranks are dropped. A prompt's loss is the mean over its pairs; the loss is the mean over the
    prompts that have at least one pair (0 when none has).

    Args:
        rewards: ``[N, K]`` floating. ranks: ``[N, K]`` integer. mask: ``[N, K]`` 0/1 or None.
    """
    dtype = compute_dtype(rewards)
    r = rewards.to(dtype)
    valid = torch.ones_like(ranks, dtype=torch.bool) if mask is None else mask.bool()
    # pair[n, w, l]: response w is ranked strictly better than response l, both valid.
    pair = valid[:, :, None] & valid[:, None, :] & (ranks[:, :, None] < ranks[:, None, :])
    gap = r[:, :, None] - r[:, None, :] - margin
    pair_f = pair.to(dtype)
    pair_loss = -F.logsigmoid(gap) * pair_f
    pair_correct = (gap + margin > 0).to(dtype) * pair_f
    pairs_per_prompt = pair_f.sum((1, 2))
    has_pairs = pairs_per_prompt > 0
    denom = pairs_per_prompt.clamp_min(1)
    prompt_loss = pair_loss.sum((1, 2)) / denom
    prompt_acc = pair_correct.sum((1, 2)) / denom
    num_with_pairs = has_pairs.to(dtype).sum()
    weight = has_pairs.to(dtype) / num_with_pairs.clamp_min(1)
    loss = (prompt_loss * weight).sum()
    accuracy = (prompt_acc * weight).sum()
    return RankingLossResult(loss, accuracy, (~has_pairs).sum())


@torch.no_grad()
def compute_advantages(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
    gamma: float = 1.0,
    lam: float = 0.95,
    kl_clamp: float | None = None,
):
    """The experience step before whitening: ``-kl_coef·KL`` per valid token, the score added at each
    row's last valid token (rows with none get no score), then GAE.

    Args:
        scores: ``[B]``; logprobs, ref_logprobs, values, mask: ``[B, T]``.
    Returns:
        ``(token_rewards, advantages, returns)``, each ``[B, T]``.
    """
    dtype = compute_dtype(values)
    valid = mask.bool()
    kl = kl_penalty(logprobs.to(dtype), ref_logprobs.to(dtype), valid, estimator, kl_clamp)
    token_rewards = -kl_coef * kl
    length = values.shape[1]
    if length == 0 or values.shape[0] == 0:
        empty = torch.zeros(values.shape, dtype=dtype, device=values.device)
        return empty, empty.clone(), empty.clone()
    positions = torch.arange(length, device=values.device).expand_as(valid)
    last = torch.where(valid, positions, torch.full_like(positions, -1)).max(dim=1).values
    has_token = last >= 0
    rows = torch.arange(values.shape[0], device=values.device)[has_token]
    token_rewards[rows, last[has_token]] += scores.to(dtype)[has_token]
    advantages, returns = gae(token_rewards, values.to(dtype), valid, gamma, lam)
    return token_rewards, advantages, returns


# ----------------------------------------------------------------------------------------------------
# PPO losses
# ----------------------------------------------------------------------------------------------------

LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean")

# |log ratio| is capped here before exp(): e^20 is far past any clip range, and the cap keeps tokens with
# a zero advantage finite (veRL caps at the same value).
LOG_RATIO_CAP = 20.0


class PolicyLossResult(NamedTuple):
    """``loss`` (scalar, differentiable) and detached stats over the valid tokens: ``clip_fraction``
    (where the clipped surrogate is the one in force), ``approx_kl`` (mean of ``(r - 1) - log r`` with
    ``r = π/π_old``: an estimate of KL(π_old‖π), 0 when nothing changed), ``entropy`` (mean entropy, None
    when not computed) and ``ref_kl`` (mean KL estimate to the reference, None without reference).
    ``logprobs``: the linear forms' per-token log-probs, detached, in the labels' shape (0 where the label
    is ``ignore_index``); None from ``ppo_policy_loss``, which is given them."""

    loss: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor
    entropy: torch.Tensor | None
    ref_kl: torch.Tensor | None
    logprobs: torch.Tensor | None = None


class ValueLossResult(NamedTuple):
    """``loss`` (scalar) and ``clip_fraction``: the share of valid tokens where the clipped error binds."""

    loss: torch.Tensor
    clip_fraction: torch.Tensor


def loss_token_weights(mask: torch.Tensor, loss_agg: str, dtype: torch.dtype) -> torch.Tensor:
    """Weights ``w`` with ``loss = Σ w·token_loss`` for an aggregation over the valid tokens.

    "token-mean": every valid token weighs 1/(valid tokens). "seq-mean-token-mean" (``mask`` ``[B, T]``):
    each sequence's token mean, then the mean over sequences with at least one valid token. No valid
    token at all gives all-zero weights (a zero loss), not NaN.
    """
    m = mask.to(dtype)
    if loss_agg == "token-mean":
        return m / m.sum().clamp_min(1)
    if loss_agg == "seq-mean-token-mean":
        per_sequence = m.sum(-1, keepdim=True)
        sequences = (per_sequence > 0).to(dtype).sum()
        return m / per_sequence.clamp_min(1) / sequences.clamp_min(1)
    raise ValueError(f"loss_agg={loss_agg!r} is not one of {LOSS_AGGREGATIONS}")


def ppo_token_losses(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps_low: float,
    clip_eps_high: float,
    dual_clip: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
):
    """The per-token clipped surrogate, plus ``kl_coef``·KL to the reference, minus ``entropy_coef``·entropy.

    ``pg = max(-A·r, -A·clip(r, 1 - eps_low, 1 + eps_high))`` with ``r = exp(logp - old)``; with
    ``dual_clip = c`` tokens with A < 0 are also capped at ``-A·c`` (Ye et al. 2020, veRL's clip_ratio_c).

    Args: all ``[...]`` of one shape; gradient flows through ``logprobs`` and ``entropy`` only.
    Returns: (token_loss ``[...]``, clipped ``[...]`` bool: where the clipped term is in force).
    """
    log_ratio = (logprobs - old_logprobs.detach()).clamp(-LOG_RATIO_CAP, LOG_RATIO_CAP)
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    token_loss = torch.maximum(unclipped, clipped)
    is_clipped = clipped > unclipped
    if dual_clip is not None:
        token_loss = torch.where(
            advantages < 0, torch.minimum(token_loss, -advantages * dual_clip), token_loss
        )
    if ref_logprobs is not None and kl_coef != 0.0:
        token_loss = token_loss + kl_coef * kl_penalty(logprobs, ref_logprobs.detach(), None, kl_estimator)
    if entropy is not None and entropy_coef != 0.0:
        token_loss = token_loss - entropy_coef * entropy
    return token_loss, is_clipped


def safe_token_inputs(valid, logprobs, old_logprobs, advantages, ref_logprobs=None, entropy=None):
    """(old, adv, ref, entropy) with the positions outside ``valid`` replaced by values that give a zero,
    finite loss and gradient there (old = ref = logp, adv = entropy = 0): padding may hold garbage."""
    safe_logp = logprobs.detach()
    zero = torch.zeros_like(safe_logp)
    old = torch.where(valid, old_logprobs, safe_logp)
    adv = torch.where(valid, advantages, zero)
    ref = None if ref_logprobs is None else torch.where(valid, ref_logprobs, safe_logp)
    ent = None if entropy is None else torch.where(valid, entropy, zero)
    return old, adv, ref, ent


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    loss_agg: str = "token-mean",
) -> PolicyLossResult:
    """PPO's clipped policy loss from per-token log-probs (see ``ppo_token_losses``), aggregated by
    ``loss_agg`` (see ``loss_token_weights``). Positions outside ``mask`` never matter, even when they
    hold inf or NaN.

    Args:
        logprobs, old_logprobs, advantages, mask: ``[B, T]`` (any one shape for "token-mean").
        ref_logprobs, entropy: the same shape, or None.
    """
    dtype = compute_dtype(logprobs)
    valid = mask.bool()
    logprobs = logprobs.to(dtype)
    old, adv, ref, ent = safe_token_inputs(
        valid,
        logprobs,
        old_logprobs.to(dtype),
        advantages.to(dtype),
        None if ref_logprobs is None else ref_logprobs.to(dtype),
        None if entropy is None else entropy.to(dtype),
    )
    token_loss, is_clipped = ppo_token_losses(
        logprobs,
        old,
        adv,
        clip_eps,
        clip_eps if clip_eps_high is None else clip_eps_high,
        dual_clip,
        ref,
        kl_coef,
        kl_estimator,
        ent,
        entropy_coef,
    )
    weights = loss_token_weights(valid, loss_agg, dtype)
    loss = torch.where(valid, token_loss * weights, torch.zeros_like(token_loss)).sum()
    with torch.no_grad():
        log_ratio = (logprobs - old).clamp(-LOG_RATIO_CAP, LOG_RATIO_CAP)
        clip_fraction = masked_mean_or_zero(is_clipped.to(dtype), valid)
        approx_kl = masked_mean_or_zero(torch.expm1(log_ratio) - log_ratio, valid)
        mean_entropy = None if ent is None else masked_mean_or_zero(ent, valid)
        ref_kl = (
            None
            if ref is None
            else masked_mean_or_zero(kl_penalty(logprobs, ref, valid, kl_estimator), valid)
        )
    return PolicyLossResult(loss, clip_fraction, approx_kl, mean_entropy, ref_kl)


def linear_ppo_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    compute_entropy: bool = False,
    entropy_coef: float = 0.0,
    **loss_options,
) -> PolicyLossResult:
    """``ppo_policy_loss`` on ``linear_logprobs(hidden, weight, labels, bias)``; positions whose label is
    ``ignore_index`` count as masked. ``old_logprobs`` None: on-policy, the old log-probs are these very
    log-probs, detached (the ratio is exactly 1). ``loss_options``: the keyword arguments of
    ``ppo_policy_loss``."""
    with_entropy = compute_entropy or entropy_coef != 0.0
    out = linear_logprobs(hidden, weight, labels, bias, temperature, ignore_index, with_entropy)
    logprobs, entropy = out if with_entropy else (out, None)
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    valid = mask.bool() & (labels != ignore_index)
    result = ppo_policy_loss(
        logprobs, old_logprobs, advantages, valid, entropy=entropy, entropy_coef=entropy_coef, **loss_options
    )
    return result._replace(logprobs=logprobs.detach())


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = 0.2,
    loss_agg: str = "token-mean",
) -> ValueLossResult:
    """PPO's clipped value loss: ``½·max((v - R)², (v_old + clip(v - v_old, ±clip) - R)²)`` per valid
    token (``clip=None``: ``½(v - R)²``), aggregated like the policy loss. Gradient flows to ``values``.

    Args: values, old_values, returns, mask: ``[B, T]`` (any one shape for "token-mean").
    """
    dtype = compute_dtype(values)
    valid = mask.bool()
    values = values.to(dtype)
    safe_values = values.detach()
    old = torch.where(valid, old_values.detach().to(dtype), safe_values)
    target = torch.where(valid, returns.detach().to(dtype), safe_values)
    error = (values - target).square()
    if clip is None:
        token_loss = 0.5 * error
        is_clipped = torch.zeros_like(valid)
    else:
        clipped_values = old + (values - old).clamp(-clip, clip)
        clipped_error = (clipped_values - target).square()
        token_loss = 0.5 * torch.maximum(error, clipped_error)
        is_clipped = clipped_error > error
    weights = loss_token_weights(valid, loss_agg, dtype)
    loss = torch.where(valid, token_loss * weights, torch.zeros_like(token_loss)).sum()
    with torch.no_grad():
        clip_fraction = masked_mean_or_zero(is_clipped.to(dtype), valid)
    return ValueLossResult(loss, clip_fraction)


def masked_mean_or_zero(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the set positions of ``mask``; 0 (not NaN) when none is set."""
    m = mask.to(x.dtype)
    return (torch.where(mask.bool(), x, torch.zeros_like(x))).sum() / m.sum().clamp_min(1)
