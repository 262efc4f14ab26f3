"""InstructGPT's K-wise pairwise ranking loss per prompt, and its gradient, in Triton.

For prompt ``n`` with responses ``k < K``: a pair ``(w, l)`` counts when both are valid (mask set) and
``rank[w] < rank[l]`` (rank 1 is best; ties give no pair). With ``x = r_w - r_l - margin``:

    prompt_loss[n]     = mean over pairs of softplus(-x) = -log sigmoid(x)
    prompt_accuracy[n] = fraction of pairs with r_w > r_l
    num_pairs[n]       = number of pairs (loss and accuracy are 0 when there is none)

    d prompt_loss / d r_w = -sigmoid(-x) / num_pairs,   d prompt_loss / d r_l = +sigmoid(-x) / num_pairs

``softplus(-x) = max(-x, 0) + log1p(e^{-|x|})`` never exponentiates a positive number, so reward gaps of 1e4
stay finite; ``sigmoid(-x)`` is formed from the same ``e^{-|x|}``.

Each program handles BLOCK_N prompts as a ``[BLOCK_N, BLOCK_K, BLOCK_K]`` (prompt, w, l) tile of all pairs,
BLOCK_K = K rounded up to a power of two. K is small (2..16 typical, up to 128), so the whole tile lives in
registers and nothing is written but the per-prompt results (forward) or one gradient per response.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import device_context
from .reduce import mean_of_sums

__all__ = ["ranking_loss_backward", "ranking_loss_forward", "ranking_loss_mean"]

# Pairs per program: 2048 over 4 warps is 16 per thread, a few live fp32 values each, no spills.
_TILE_PAIRS = 2048
# Responses per prompt the single-tile kernels hold: a 128 x 128 tile is 16k pairs, 32 per thread at 16 warps.
_MAX_K = 128


# ----------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _log1p(e):
    """``log(1 + e)`` for ``e`` in [0, 1], to fp32 relative precision (Triton has no log1p).

    Below 1/8 the alternating series through ``e^8 / 8`` (next term < 1e-8 relative); above, ``1 + e`` has
    at most a half-ulp rounding that ``log`` turns into < 5e-7 relative error.
    """
    p = -0.125
    p = p * e + 0.14285714285714285
    p = p * e - 0.16666666666666666
    p = p * e + 0.2
    p = p * e - 0.25
    p = p * e + 0.3333333333333333
    p = p * e - 0.5
    p = p * e + 1.0
    return tl.where(e < 0.125, p * e, tl.log(1.0 + e))


@triton.jit
def _pair_tile(
    rewards_ptr,
    ranks_ptr,
    mask_ptr,
    stride_rewards_row,
    stride_ranks_row,
    stride_mask_row,
    N,
    K,
    margin,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """Loads this program's prompts and forms the pair tile.

    Returns ``(rows, cols, inb, pair, x, e, w_wins)``: rows int64[BLOCK_N], cols int32[BLOCK_K],
    inb bool[BLOCK_N, BLOCK_K] (in range), and over [BLOCK_N, BLOCK_K (w), BLOCK_K (l)]: pair (bool, the pair
    counts), x = r_w - r_l - margin, e = exp(-|x|), w_wins = r_w > r_l. x and e are garbage off pairs.
    """
    # int64 row offsets: N * stride can pass 2^31 elements.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    inb = (rows[:, None] < N) & (cols[None, :] < K)
    r = tl.load(rewards_ptr + rows[:, None] * stride_rewards_row + cols[None, :], mask=inb, other=0.0)
    r = r.to(tl.float32)
    rank = tl.load(ranks_ptr + rows[:, None] * stride_ranks_row + cols[None, :], mask=inb, other=0)
    valid = inb
    if HAS_MASK:
        m = tl.load(mask_ptr + rows[:, None] * stride_mask_row + cols[None, :], mask=inb, other=0)
        valid = valid & (m != 0)

    r_w = r[:, :, None]
    r_l = r[:, None, :]
    pair = valid[:, :, None] & valid[:, None, :] & (rank[:, :, None] < rank[:, None, :])
    x = r_w - r_l - margin
    e = tl.exp(-tl.abs(x))
    return rows, cols, inb, pair, x, e, r_w > r_l


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _ranking_loss_fwd_kernel(
    loss_ptr,
    accuracy_ptr,
    num_pairs_ptr,
    rewards_ptr,
    ranks_ptr,
    mask_ptr,
    stride_rewards_row,
    stride_ranks_row,
    stride_mask_row,
    N,
    K,
    margin,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    """One program per BLOCK_N prompts.

    loss_ptr, accuracy_ptr, num_pairs_ptr: f32[N] outputs. rewards_ptr: [N, K] float; ranks_ptr: int64[N, K];
    mask_ptr: uint8[N, K] (only read when HAS_MASK); each with its own row stride and unit stride along K.
    """
    rows, cols, inb, pair, x, e, w_wins = _pair_tile(
        rewards_ptr,
        ranks_ptr,
        mask_ptr,
        stride_rewards_row,
        stride_ranks_row,
        stride_mask_row,
        N,
        K,
        margin,
        BLOCK_N,
        BLOCK_K,
        HAS_MASK,
    )
    softplus = tl.maximum(-x, 0.0) + _log1p(e)
    # where, not a multiply: off-pair entries may come from NaN / inf padding rewards.
    n_pairs = tl.sum(tl.sum(pair.to(tl.float32), axis=2), axis=1)
    loss_sum = tl.sum(tl.sum(tl.where(pair, softplus, 0.0), axis=2), axis=1)
    wins = tl.sum(tl.sum((pair & w_wins).to(tl.float32), axis=2), axis=1)
    denom = tl.maximum(n_pairs, 1.0)  # no pair: sums are 0, so both results are 0
    row_ok = rows < N
    tl.store(loss_ptr + rows, loss_sum / denom, mask=row_ok)
    tl.store(accuracy_ptr + rows, wins / denom, mask=row_ok)
    tl.store(num_pairs_ptr + rows, n_pairs, mask=row_ok)


@triton.jit
def _ranking_loss_bwd_kernel(
    drewards_ptr,
    grad_loss_ptr,
    normalizer_ptr,
    rewards_ptr,
    ranks_ptr,
    mask_ptr,
    stride_rewards_row,
    stride_ranks_row,
    stride_mask_row,
    N,
    K,
    margin,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MEAN: tl.constexpr,
):
    """One program per BLOCK_N prompts.

    drewards_ptr: f32[N, K] contiguous output. grad_loss_ptr: f32[N], the gradient of each prompt's loss;
    or, when MEAN, one f32 value, the gradient of the mean over the prompts with a pair, which is divided
    here by normalizer_ptr's one value (how many prompts that mean took). Other inputs as in the forward.
    """
    rows, cols, inb, pair, x, e, w_wins = _pair_tile(
        rewards_ptr,
        ranks_ptr,
        mask_ptr,
        stride_rewards_row,
        stride_ranks_row,
        stride_mask_row,
        N,
        K,
        margin,
        BLOCK_N,
        BLOCK_K,
        HAS_MASK,
    )
    # sigmoid(-x) from e = exp(-|x|): e / (1 + e) for x >= 0, 1 / (1 + e) otherwise; no overflow.
    sig = tl.where(x >= 0.0, e, 1.0) / (1.0 + e)
    s = tl.where(pair, sig, 0.0)
    n_pairs = tl.sum(tl.sum(pair.to(tl.float32), axis=2), axis=1)
    row_ok = rows < N
    if MEAN:
        g = tl.load(grad_loss_ptr) / tl.load(normalizer_ptr)
    else:
        g = tl.load(grad_loss_ptr + rows, mask=row_ok, other=0.0)
    # A prompt without a pair has no loss, so none of the mean's gradient.
    scale = tl.where(n_pairs > 0.0, g / tl.maximum(n_pairs, 1.0), 0.0)
    # Response k gains sigmoid(-x) as the loser (sum over w, axis 1) and loses it as the winner (axis 2).
    d = (tl.sum(s, axis=1) - tl.sum(s, axis=2)) * scale[:, None]
    tl.store(drewards_ptr + rows[:, None] * K + cols[None, :], d, mask=inb)


# ----------------------------------------------------------------------------------------------------------
# Host wrappers
# ----------------------------------------------------------------------------------------------------------


def _prepare(rewards: torch.Tensor, ranks: torch.Tensor, mask: torch.Tensor | None):
    assert rewards.dim() == 2 and ranks.shape == rewards.shape
    assert ranks.dtype == torch.int64
    n_responses = rewards.shape[1]
    assert n_responses <= _MAX_K, f"at most {_MAX_K} responses per prompt, got {n_responses}"
    if mask is not None:
        assert mask.shape == rewards.shape
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)  # same bytes; Triton loads bool pointers as int1
        assert mask.dtype == torch.uint8
    inputs = (rewards, ranks) if mask is None else (rewards, ranks, mask)
    assert n_responses <= 1 or all(x.stride(1) == 1 for x in inputs), "unit stride along K required"
    return mask


def _launch_config(n_prompts: int, n_responses: int, block_n: int | None) -> tuple[int, int, int]:
    block_k = max(2, triton.next_power_of_2(n_responses))
    if block_n is None:
        block_n = max(1, min(_TILE_PAIRS // (block_k * block_k), triton.next_power_of_2(n_prompts)))
    elif block_n < 1 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two, got {block_n}")
    # ~16 pairs per thread (32 for the largest tiles).
    num_warps = max(1, min(16, block_n * block_k * block_k // 512))
    return block_n, block_k, num_warps


def ranking_loss_forward(
    rewards: torch.Tensor,
    ranks: torch.Tensor,
    mask: torch.Tensor | None,
    margin: float,
    *,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-prompt K-wise ranking loss, accuracy and pair count.

    Args:
        rewards: ``f32[N, K]`` (any float dtype is read as fp32), unit stride along K.
        ranks: ``int64[N, K]``, rank 1 best; equal ranks make no pair.
        mask: ``uint8[N, K]`` or None (all valid).
        margin: subtracted from every reward gap inside the loss (not the accuracy).
        block_n: prompts per program (power of two; None = automatic). Mainly for tests.

    Returns:
        ``(prompt_loss f32[N], prompt_accuracy f32[N], num_pairs f32[N])``; loss and accuracy are 0 for a
        prompt without pairs.
    """
    mask = _prepare(rewards, ranks, mask)
    n_prompts, n_responses = rewards.shape
    device = rewards.device
    loss = torch.empty(n_prompts, dtype=torch.float32, device=device)
    accuracy = torch.empty_like(loss)
    num_pairs = torch.empty_like(loss)
    if n_prompts == 0:
        return loss, accuracy, num_pairs
    if n_responses == 0:
        return loss.zero_(), accuracy.zero_(), num_pairs.zero_()

    bn, bk, num_warps = _launch_config(n_prompts, n_responses, block_n)
    with device_context(rewards):
        _ranking_loss_fwd_kernel[(triton.cdiv(n_prompts, bn),)](
            loss,
            accuracy,
            num_pairs,
            rewards,
            ranks,
            mask if mask is not None else ranks,  # unused slot when HAS_MASK is false
            rewards.stride(0),
            ranks.stride(0),
            mask.stride(0) if mask is not None else 0,
            n_prompts,
            n_responses,
            float(margin),
            BLOCK_N=bn,
            BLOCK_K=bk,
            HAS_MASK=mask is not None,
            num_warps=num_warps,
        )
    return loss, accuracy, num_pairs


def ranking_loss_mean(
    rewards: torch.Tensor,
    ranks: torch.Tensor,
    mask: torch.Tensor | None,
    margin: float,
    *,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The K-wise ranking loss and accuracy as means over the prompts that have a pair, reduced on the
    device by the shared epilogue (reduce.mean_of_sums) after the per-prompt kernel.

    Args: as ``ranking_loss_forward``.
    Returns:
        ``(loss, accuracy, num_prompts_without_pairs, normalizer)``: f32, f32, int64 and f32 scalars; the
        normalizer (prompts with a pair, at least 1) is what the backward divides by.
    """
    loss, accuracy, num_pairs = ranking_loss_forward(rewards, ranks, mask, margin, block_n=block_n)
    mean_loss, mean_accuracy, normalizer, without_pairs = mean_of_sums(
        loss, num_pairs, accuracy, indicator=True, count_empty=True
    )
    return mean_loss, mean_accuracy, without_pairs, normalizer


def ranking_loss_backward(
    grad_loss: torch.Tensor,
    rewards: torch.Tensor,
    ranks: torch.Tensor,
    mask: torch.Tensor | None,
    margin: float,
    *,
    normalizer: torch.Tensor | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Gradient w.r.t. ``rewards`` of ``sum(grad_loss * prompt_loss)`` or, given the ``normalizer``, of
    ``grad_loss * ranking_loss_mean's loss``.

    Args:
        grad_loss: ``f32[N]`` per prompt (made contiguous fp32 here: autograd may hand in an expanded one),
            or with ``normalizer`` one value (0-dim, or any tensor of one value).
        rewards, ranks, mask, margin: as given to the forward.
        normalizer: ``ranking_loss_mean``'s normalizer, or None for per-prompt gradients.
        block_n: prompts per program (power of two; None = automatic). Mainly for tests.

    Returns:
        ``f32[N, K]`` contiguous; 0 for masked responses and prompts without pairs.
    """
    mask = _prepare(rewards, ranks, mask)
    n_prompts, n_responses = rewards.shape
    mean = normalizer is not None
    assert grad_loss.numel() == (1 if mean else n_prompts)
    drewards = torch.empty((n_prompts, n_responses), dtype=torch.float32, device=rewards.device)
    if n_prompts == 0 or n_responses == 0:
        return drewards
    # The mean's gradient is one value, read in place; per-prompt gradients are read as a contiguous row.
    grad_loss = grad_loss.reshape(1) if mean else grad_loss.reshape(n_prompts).to(torch.float32).contiguous()

    bn, bk, num_warps = _launch_config(n_prompts, n_responses, block_n)
    with device_context(rewards):
        _ranking_loss_bwd_kernel[(triton.cdiv(n_prompts, bn),)](
            drewards,
            grad_loss,
            normalizer if mean else grad_loss,  # unused slot without MEAN
            rewards,
            ranks,
            mask if mask is not None else ranks,
            rewards.stride(0),
            ranks.stride(0),
            mask.stride(0) if mask is not None else 0,
            n_prompts,
            n_responses,
            float(margin),
            BLOCK_N=bn,
            BLOCK_K=bk,
            HAS_MASK=mask is not None,
            MEAN=mean,
            num_warps=num_warps,
        )
    return drewards
