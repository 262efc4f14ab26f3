"""Outcome advantages of critic-free RL (GRPO, RLOO, REINFORCE++) before any whitening, in Triton.

Rows ``g * k + j`` (``j < k``) are the k responses of prompt g, with scores ``s``. Per group, in fp64
(k numbers; squares of fp32 scores up to 3.4e38 fit, and an all-equal group gives exactly 0):

    pivot = s[g*k];  c = s - pivot;  mean_c = mean(c);  d = c - mean_c  (= s - mean)
    std = sqrt(sum(d^2) / (k - 1))

MODE picks each row's value, written at the row's valid tokens (0 elsewhere):

    CENTER          d                    (GRPO without std scaling, REINFORCE++-baseline)
    NORMALIZE       d / (std + eps)      (GRPO; 0 when std + eps == 0)
    LEAVE_ONE_OUT   d * k / (k - 1)      (RLOO; k >= 2)
    DISCOUNT        s * gamma^(valid tokens after t)   (REINFORCE++; no grouping)

A group of one has mean 0 and std 1 (veRL's rule). These are the formulas of csrc/common/group_advantages.h.

Group modes: one program per row computes its group's statistics (a BLOCK_K vector of the k scores) and
broadcasts the value over the row in BLOCK_T steps. DISCOUNT: one program per row walks its time blocks
from the end of the row to the start, positions in reversed time (lane j holds ``t = T - 1 - (start + j)``,
as in gae.py); a cumulative sum of the valid flags counts the valid tokens after each position, carried
from block to block, and the discount is ``exp2(count * log2(gamma))`` in fp32 with log2(gamma) from the
host in double: its error stays near 1e-7 of the score for any gamma, where ``gamma_f32 ** count`` would
carry gamma's rounding ``count`` times.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._utils import device_context
from .gae import _as_uint8_mask, _block_t_for

__all__ = ["CENTER", "DISCOUNT", "LEAVE_ONE_OUT", "NORMALIZE", "group_advantages_forward"]

# Mode codes: the OutcomeMode of csrc/common/group_advantages.h.
CENTER, NORMALIZE, LEAVE_ONE_OUT, DISCOUNT = 0, 1, 2, 3
# The same codes as constexprs for the kernels: compiled Triton reads no plain global inside a kernel
# (the interpreter does, so only a GPU or the sm_90 compile test catches a plain one).
_NORMALIZE = tl.constexpr(NORMALIZE)
_LEAVE_ONE_OUT = tl.constexpr(LEAVE_ONE_OUT)
_DISCOUNT = tl.constexpr(DISCOUNT)

# Smallest score block: keeps tiny groups on a well-formed layout; lanes past k are masked out.
_MIN_BLOCK_K = 16
# Stand-in for log2(0) when gamma = 0: 2^(-1e4 * n) is 0 in fp32 for every n >= 1, with no 0 * inf.
_LOG2_ZERO = -1.0e4


@triton.jit
def _row_value(scores_ptr, row, eps, GROUP_SIZE: tl.constexpr, MODE: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 value of response ``row`` under MODE (not DISCOUNT) from its group's k scores."""
    score = tl.load(scores_ptr + row).to(tl.float64)
    value = score  # veRL's group of one: mean 0, std 1 (RLOO needs k >= 2)
    if GROUP_SIZE == 1:
        if MODE == _NORMALIZE:
            value = score / (1.0 + eps)
    else:
        first = row // GROUP_SIZE * GROUP_SIZE
        lanes = tl.arange(0, BLOCK_K)
        inside = lanes < GROUP_SIZE
        s = tl.load(scores_ptr + first + lanes, mask=inside, other=0.0).to(tl.float64)
        pivot = tl.load(scores_ptr + first).to(tl.float64)
        c = tl.where(inside, s - pivot, 0.0)
        mean_c = tl.sum(c, axis=0) / GROUP_SIZE
        dev = tl.where(inside, c - mean_c, 0.0)
        d = (score - pivot) - mean_c
        if MODE == _NORMALIZE:
            std = tl.sqrt(tl.sum(dev * dev, axis=0) / (GROUP_SIZE - 1))
            denom = std + eps
            value = tl.where(denom > 0.0, d / tl.where(denom > 0.0, denom, 1.0), 0.0)
        elif MODE == _LEAVE_ONE_OUT:
            value = d * GROUP_SIZE / (GROUP_SIZE - 1)
        else:
            value = d
    return value.to(tl.float32)


@triton.jit
def _group_advantages_fwd_kernel(
    out_ptr,
    scores_ptr,
    mask_ptr,
    stride_mask_row,
    T,
    eps,
    log2_gamma,
    GROUP_SIZE: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """One program per row.

    out_ptr: f32[N, T] contiguous output. scores_ptr: f32[N] contiguous. mask_ptr: uint8[N, T] with its
    row stride and unit stride along T. eps: NORMALIZE only (fp64 math); log2_gamma: DISCOUNT only.
    """
    row = tl.program_id(0).to(tl.int64)
    # int64 row offsets: N * T can pass 2^31 elements.
    m_row = mask_ptr + row * stride_mask_row
    out_row = out_ptr + row * T
    lanes = tl.arange(0, BLOCK_T)
    if MODE == _DISCOUNT:
        score = tl.load(scores_ptr + row).to(tl.float32)
        after_block = 0  # valid tokens right of the current block
        for start in range(0, T, BLOCK_T):
            t = T - 1 - (start + lanes)  # reversed time, see the module docstring
            inb = t >= 0
            valid = (tl.load(m_row + t, mask=inb, other=0) != 0) & inb
            flags = valid.to(tl.int32)
            # Valid tokens after t: those in earlier lanes of this block, plus the blocks to the right.
            after = after_block + tl.cumsum(flags, axis=0) - flags
            discount = tl.where(after == 0, 1.0, tl.exp2(after.to(tl.float32) * log2_gamma))
            tl.store(out_row + t, tl.where(valid, score * discount, 0.0), mask=inb)
            after_block += tl.sum(flags, axis=0)
    else:
        value = _row_value(scores_ptr, row, eps, GROUP_SIZE, MODE, BLOCK_K)
        for start in range(0, T, BLOCK_T):
            t = start + lanes
            inb = t < T
            valid = tl.load(m_row + t, mask=inb, other=0) != 0
            tl.store(out_row + t, tl.where(valid, value, 0.0), mask=inb)


def group_advantages_forward(
    scores: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    mode: int,
    gamma: float,
    eps: float,
    *,
    block_t: int | None = None,
) -> torch.Tensor:
    """Each row's outcome value at its valid tokens (see the module docstring), before any whitening.

    Args:
        scores: ``f32[N]``, N = B * group_size; rows of a group are consecutive.
        mask: ``uint8[N, T]`` (or bool), unit stride along T.
        group_size: k, dividing N (>= 2 for LEAVE_ONE_OUT). mode: CENTER, NORMALIZE, LEAVE_ONE_OUT or
            DISCOUNT. gamma: DISCOUNT's discount in [0, 1]. eps: NORMALIZE's epsilon, >= 0.
        block_t: time positions per block step (power of two; None = automatic). Mainly for tests: a small
            one exercises the carry between blocks.

    Returns:
        ``f32[N, T]`` contiguous, 0 where the mask is 0.
    """
    assert mask.dim() == 2 and scores.shape == (mask.shape[0],)
    assert mode in (CENTER, NORMALIZE, LEAVE_ONE_OUT, DISCOUNT), f"unknown mode {mode}"
    assert group_size >= 1 and mask.shape[0] % group_size == 0
    assert mode != LEAVE_ONE_OUT or group_size >= 2
    mask = _as_uint8_mask(mask)
    n_rows, n_steps = mask.shape
    assert n_steps <= 1 or mask.stride(1) == 1
    out = torch.empty((n_rows, n_steps), dtype=torch.float32, device=mask.device)
    if n_rows == 0 or n_steps == 0:
        return out

    scores = scores.to(torch.float32).contiguous()  # N elements; a no-op for the usual f32 input
    grouped = mode != DISCOUNT
    log2_gamma = (math.log2(gamma) if gamma > 0 else _LOG2_ZERO) if not grouped else 0.0
    bt, num_warps = _block_t_for(n_steps, block_t)
    with device_context(mask):
        _group_advantages_fwd_kernel[(n_rows,)](
            out,
            scores,
            mask,
            mask.stride(0),
            n_steps,
            float(eps),
            log2_gamma,
            # DISCOUNT ignores the grouping: one compiled variant for every k.
            GROUP_SIZE=group_size if grouped else 1,
            MODE=mode,
            BLOCK_K=max(_MIN_BLOCK_K, triton.next_power_of_2(group_size)) if grouped else _MIN_BLOCK_K,
            BLOCK_T=bt,
            num_warps=num_warps,
        )
    return out
