"""Generalised advantage estimation (veRL's mask-carry semantics) as block-wise parallel scans, in Triton.

The sequential definition, per row, walking t from T-1 down to 0 with ``next_v = 0``, ``last = 0``:

    where mask[t]:  delta = r[t] + gamma * next_v - v[t];  last = delta + gamma * lam * last
                    adv[t] = last;  next_v = v[t]
    elsewhere:      next_v and last carry over unchanged;  adv[t] = 0
    returns = adv + v where mask, else 0

Both carried quantities are first-order linear recurrences in t, run backwards, so each is an inclusive scan
of affine maps ``x -> a x + b`` composed right to left:

    next_v_t = value at the nearest valid position > t     a = 1 - mask[t+1],  b = mask[t+1] * v[t+1]
    last_t   = a_t * last_{t+1} + b_t                      a = mask ? gamma*lam : 1,  b = mask ? delta_t : 0

``next_v`` is an exclusive scan (it starts at t+1); it is computed as an inclusive scan over the inputs
shifted by one position (``mask[t+1], v[t+1]``, loaded a second time at offset +1, from cache).

Each program owns one row and walks it in blocks of BLOCK_T from the end of the row to the start, passing
the two carries (next_v and last at the block's leftmost position) to the next block. Inside a block the
positions are laid out in reversed time (lane j holds ``t = T - 1 - (start + j)``) and scanned with a
*forward* ``tl.associative_scan``: the compiled ``reverse=True`` scan has had combine-order bugs with
non-commutative combines (triton-lang/triton#4362), the forward order is settled (triton-lang/triton#2362).
All arithmetic is fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import device_context

__all__ = ["gae_forward"]

# Largest time block: 1024 positions over 4 warps is 8 per thread for the in-register part of each scan,
# and a T = 32k row takes 32 sequential block steps.
_MAX_BLOCK_T = 1024
# Smallest block: keeps T = 1 on a well-formed layout; padded lanes are identity maps.
_MIN_BLOCK_T = 16


# ----------------------------------------------------------------------------------------------------------
# Device helpers (also used by the fused advantages kernel)
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _affine_combine(a_far, b_far, a_near, b_near):
    """Composition ``near ∘ far`` of ``x -> a x + b`` maps: ``far`` is the earlier one in scan order.

    In reversed time that is the map of the later positions, applied first.
    """
    return a_near * a_far, a_near * b_far + b_near


@triton.jit
def _gae_block(
    rewards,
    values,
    valid,
    values_next,
    valid_next,
    next_v_carry,
    last_carry,
    gamma,
    gamma_lam,
    BLOCK_T: tl.constexpr,
):
    """One block step of the row walk, on BLOCK_T positions laid out in reversed time.

    rewards, values: f32[BLOCK_T] at positions t (lane j = T - 1 - (start + j)); valid: bool[BLOCK_T];
    values_next, valid_next: the same at t + 1 (valid_next False where t + 1 = T). Lanes past the row
    (t < 0) must have valid and valid_next False. Values at invalid positions are never used, so padding
    may hold garbage (inf, NaN). next_v_carry, last_carry: fp32 scalars from the block to the right (0, 0
    for the first block).

    Returns ``(adv, ret, next_v_carry, last_carry)``: f32[BLOCK_T] advantages and returns (0 where not
    valid), and the carries for the block to the left.
    """
    # next_v: nearest valid value at positions >= t + 1, falling back to the carry.
    a_nv = tl.where(valid_next, 0.0, 1.0)
    b_nv = tl.where(valid_next, values_next, 0.0)
    a_nv, b_nv = tl.associative_scan((a_nv, b_nv), 0, _affine_combine)
    # a_nv is exactly 0 or 1, so this selects without rounding.
    next_v = a_nv * next_v_carry + b_nv

    delta = rewards + gamma * next_v - values
    a = tl.where(valid, gamma_lam, 1.0)
    b = tl.where(valid, delta, 0.0)
    a, b = tl.associative_scan((a, b), 0, _affine_combine)
    last = a * last_carry + b

    adv = tl.where(valid, last, 0.0)
    ret = tl.where(valid, last + values, 0.0)

    # Carries = values at the block's last lane (its leftmost position): lanes past the row are identity
    # maps, so the last lane also holds them when the block is partial.
    is_end = tl.arange(0, BLOCK_T) == BLOCK_T - 1
    next_v_carry = tl.sum(tl.where(is_end, next_v, 0.0), axis=0)
    last_carry = tl.sum(tl.where(is_end, last, 0.0), axis=0)
    return adv, ret, next_v_carry, last_carry


# ----------------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _gae_fwd_kernel(
    adv_ptr,
    ret_ptr,
    rewards_ptr,
    values_ptr,
    mask_ptr,
    stride_rewards_row,
    stride_values_row,
    stride_mask_row,
    T,
    gamma,
    gamma_lam,
    BLOCK_T: tl.constexpr,
):
    """One program per row, walking its time blocks from the end of the row to the start.

    adv_ptr, ret_ptr: f32[B, T] contiguous outputs. rewards_ptr, values_ptr: [B, T] float (loaded as fp32);
    mask_ptr: uint8[B, T]; each with its own row stride and unit stride along T.
    """
    row = tl.program_id(0).to(tl.int64)
    # int64 row offsets: B * T can pass 2^31 elements.
    r_row = rewards_ptr + row * stride_rewards_row
    v_row = values_ptr + row * stride_values_row
    m_row = mask_ptr + row * stride_mask_row
    out_off = row * T
    lanes = tl.arange(0, BLOCK_T)

    next_v_carry = 0.0
    last_carry = 0.0
    for start in range(0, T, BLOCK_T):
        t = T - 1 - (start + lanes)  # reversed time, see the module docstring
        inb = t >= 0
        valid = (tl.load(m_row + t, mask=inb, other=0) != 0) & inb
        r = tl.load(r_row + t, mask=inb, other=0.0).to(tl.float32)
        v = tl.load(v_row + t, mask=inb, other=0.0).to(tl.float32)
        inb_next = inb & (t + 1 < T)
        valid_next = (tl.load(m_row + t + 1, mask=inb_next, other=0) != 0) & inb_next
        v_next = tl.load(v_row + t + 1, mask=inb_next, other=0.0).to(tl.float32)

        adv, ret, next_v_carry, last_carry = _gae_block(
            r, v, valid, v_next, valid_next, next_v_carry, last_carry, gamma, gamma_lam, BLOCK_T
        )
        tl.store(adv_ptr + out_off + t, adv, mask=inb)
        tl.store(ret_ptr + out_off + t, ret, mask=inb)


# ----------------------------------------------------------------------------------------------------------
# Host wrapper
# ----------------------------------------------------------------------------------------------------------


def _block_t_for(n_steps: int, block_t: int | None = None) -> tuple[int, int]:
    """``(BLOCK_T, num_warps)`` for rows of ``n_steps`` positions; ``block_t`` overrides (power of two)."""
    if block_t is None:
        block_t = max(_MIN_BLOCK_T, min(triton.next_power_of_2(max(n_steps, 1)), _MAX_BLOCK_T))
    elif block_t < 1 or block_t & (block_t - 1):
        raise ValueError(f"block_t must be a power of two, got {block_t}")
    # ~8 positions per thread: the in-register scan is short and the warp shuffles stay few.
    return block_t, max(1, min(4, block_t // 256))


def _as_uint8_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask viewed as its uint8 bytes (Triton loads bool pointers as int1); uint8 passes through."""
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8)
    assert mask.dtype == torch.uint8, f"mask must be uint8, got {mask.dtype}"
    return mask


def gae_forward(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    *,
    block_t: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns with mask-carry semantics (see the module docstring).

    Args:
        rewards, values: ``f32[B, T]``, unit stride along T (any row stride).
        mask: ``uint8[B, T]`` (0 = not a response token), unit stride along T.
        gamma, lam: discount and GAE lambda.
        block_t: time positions per block step (power of two; None = automatic). Mainly for tests: a small
            one exercises the carry between blocks.

    Returns:
        ``(advantages f32[B, T], returns f32[B, T])``, contiguous, both 0 where the mask is 0.
    """
    assert rewards.dim() == 2 and values.shape == rewards.shape and mask.shape == rewards.shape
    mask = _as_uint8_mask(mask)
    n_rows, n_steps = values.shape
    assert n_steps <= 1 or (rewards.stride(1) == 1 and values.stride(1) == 1 and mask.stride(1) == 1)
    advantages = torch.empty((n_rows, n_steps), dtype=torch.float32, device=values.device)
    returns = torch.empty_like(advantages)
    if n_rows == 0 or n_steps == 0:
        return advantages, returns

    bt, num_warps = _block_t_for(n_steps, block_t)
    with device_context(values):
        _gae_fwd_kernel[(n_rows,)](
            advantages,
            returns,
            rewards,
            values,
            mask,
            rewards.stride(0),
            values.stride(0),
            mask.stride(0),
            n_steps,
            float(gamma),
            float(gamma) * float(lam),
            BLOCK_T=bt,
            num_warps=num_warps,
        )
    return advantages, returns
