"""KL-penalised token rewards + GAE, fused into one row walk, in Triton.

Per row ``b`` of a ``[B, T]`` batch, with ``KL`` the clamped per-token estimate of ``kl_penalty``:

    token_reward[b, t] = -kl_coef * KL(logprobs[b, t] - ref_logprobs[b, t])    where mask[b, t], else 0
    token_reward[b, t_last] += scores[b]          t_last = last valid position of row b (none: no score)
    advantages, returns = GAE(token_reward, values, mask, gamma, lam)           (gae.py semantics)

The kernel is the GAE kernel with the reward computed in registers instead of loaded: one program per row
walks its time blocks from the end of the row to the start (positions in reversed time, see gae.py). The
last valid position is the smallest reversed index holding a valid token; it is found in the first block
step that sees one and carried, like ``next_v``, to the blocks further left (where it never matches).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._utils import device_context
from .gae import _as_uint8_mask, _block_t_for, _gae_block
from .kl_penalty import ABS, K1, K2, K3, _kl_value

__all__ = ["advantages_forward"]


@triton.jit
def _advantages_fwd_kernel(
    token_rewards_ptr,
    adv_ptr,
    ret_ptr,
    scores_ptr,
    logprobs_ptr,
    ref_logprobs_ptr,
    values_ptr,
    mask_ptr,
    stride_logprobs_row,
    stride_ref_logprobs_row,
    stride_values_row,
    stride_mask_row,
    T,
    kl_coef,
    clamp,
    gamma,
    gamma_lam,
    BLOCK_T: tl.constexpr,
    ESTIMATOR: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
):
    """One program per row.

    token_rewards_ptr, adv_ptr, ret_ptr: f32[B, T] contiguous outputs. scores_ptr: f32[B] contiguous.
    logprobs_ptr, ref_logprobs_ptr: [B, T] same float dtype; values_ptr: [B, T] float; mask_ptr: uint8[B, T];
    each with its own row stride and unit stride along T. clamp is only read when HAS_CLAMP.
    """
    row = tl.program_id(0).to(tl.int64)
    # int64 row offsets: B * T can pass 2^31 elements.
    lp_row = logprobs_ptr + row * stride_logprobs_row
    ref_row = ref_logprobs_ptr + row * stride_ref_logprobs_row
    v_row = values_ptr + row * stride_values_row
    m_row = mask_ptr + row * stride_mask_row
    out_off = row * T
    lanes = tl.arange(0, BLOCK_T)
    score = tl.load(scores_ptr + row).to(tl.float32)

    next_v_carry = 0.0
    last_carry = 0.0
    # Reversed index of the row's last valid position; T (past every lane of the row) until one is seen.
    last_valid_s = T
    for start in range(0, T, BLOCK_T):
        s = start + lanes
        t = T - 1 - s
        inb = t >= 0
        valid = (tl.load(m_row + t, mask=inb, other=0) != 0) & inb
        logp = tl.load(lp_row + t, mask=inb, other=0.0).to(tl.float32)
        ref = tl.load(ref_row + t, mask=inb, other=0.0).to(tl.float32)
        v = tl.load(v_row + t, mask=inb, other=0.0).to(tl.float32)
        inb_next = inb & (t + 1 < T)
        valid_next = (tl.load(m_row + t + 1, mask=inb_next, other=0) != 0) & inb_next
        v_next = tl.load(v_row + t + 1, mask=inb_next, other=0.0).to(tl.float32)

        last_valid_s = tl.minimum(last_valid_s, tl.min(tl.where(valid, s, T), axis=0))
        kl = _kl_value(logp - ref, clamp, ESTIMATOR, HAS_CLAMP)
        # where, not a multiply: padding may hold -inf logprobs whose kl is NaN.
        r = tl.where(valid, -kl_coef * kl, 0.0) + tl.where(valid & (s == last_valid_s), score, 0.0)
        tl.store(token_rewards_ptr + out_off + t, r, mask=inb)

        adv, ret, next_v_carry, last_carry = _gae_block(
            r, v, valid, v_next, valid_next, next_v_carry, last_carry, gamma, gamma_lam, BLOCK_T
        )
        tl.store(adv_ptr + out_off + t, adv, mask=inb)
        tl.store(ret_ptr + out_off + t, ret, mask=inb)


def advantages_forward(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: int,
    clamp: float,
    gamma: float,
    lam: float,
    *,
    block_t: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token rewards (score at the last valid token minus ``kl_coef`` * KL) and their GAE, in one kernel.

    Args:
        scores: ``f32[B]`` sequence-level rewards.
        logprobs, ref_logprobs: ``[B, T]`` same dtype (float32 / bfloat16 / float16), unit stride along T.
        values: ``f32[B, T]``, unit stride along T. mask: ``uint8[B, T]``, unit stride along T.
        kl_coef: weight of the KL penalty. estimator, clamp: as in ``kl_penalty_forward`` (0 = k1, 1 = k2,
            2 = k3, 3 = abs; ``float('inf')`` = no clamp).
        gamma, lam: discount and GAE lambda.
        block_t: time positions per block step (power of two; None = automatic). Mainly for tests.

    Returns:
        ``(token_rewards, advantages, returns)``, each ``f32[B, T]`` contiguous, 0 where the mask is 0.
    """
    assert logprobs.dim() == 2
    assert ref_logprobs.shape == logprobs.shape and ref_logprobs.dtype == logprobs.dtype
    assert values.shape == logprobs.shape and mask.shape == logprobs.shape
    assert scores.shape == (logprobs.shape[0],)
    assert estimator in (K1, K2, K3, ABS), f"unknown estimator code {estimator}"
    mask = _as_uint8_mask(mask)
    n_rows, n_steps = logprobs.shape
    assert n_steps <= 1 or all(x.stride(1) == 1 for x in (logprobs, ref_logprobs, values, mask))
    device = logprobs.device
    token_rewards = torch.empty((n_rows, n_steps), dtype=torch.float32, device=device)
    advantages = torch.empty_like(token_rewards)
    returns = torch.empty_like(token_rewards)
    if n_rows == 0 or n_steps == 0:
        return token_rewards, advantages, returns

    scores = scores.to(torch.float32).contiguous()  # B elements; a no-op for the usual f32 input
    clamp = float(clamp)
    has_clamp = not math.isinf(clamp)
    bt, num_warps = _block_t_for(n_steps, block_t)
    with device_context(logprobs):
        _advantages_fwd_kernel[(n_rows,)](
            token_rewards,
            advantages,
            returns,
            scores,
            logprobs,
            ref_logprobs,
            values,
            mask,
            logprobs.stride(0),
            ref_logprobs.stride(0),
            values.stride(0),
            mask.stride(0),
            n_steps,
            float(kl_coef),
            clamp if has_clamp else 0.0,  # unused slot when HAS_CLAMP is false
            float(gamma),
            float(gamma) * float(lam),
            BLOCK_T=bt,
            ESTIMATOR=estimator,
            HAS_CLAMP=has_clamp,
            num_warps=num_warps,
        )
    return token_rewards, advantages, returns
