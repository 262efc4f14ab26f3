"""Fused token sampling from logits (temperature, top-k, top-p, min-p), in Triton.

For each row ``b`` of ``logits[B, V]``, everything in fp32 except the draw itself:

    m   = max_j fl(x_j * inv_T),   t_j = fma(x_j, inv_T, -m),   e_j = exp(t_j)   (the max has e ≈ 1)
    tau = 0
    top_k in (0, V):  tau_k = the k-th largest e_j, ties counted (else tau_k = 0)
    top_p < 1:        tau   = max(tau_k, largest v with  sum_{e_j >= max(v, tau_k)} e_j >= top_p * S_k),
                      S_k   = sum_{e_j >= tau_k} e_j
    min_p > 0:        tau   = max(tau, min_p * e_max),  e_max = exp(t) of the largest logit (≈ 1)
    K   = {j : e_j >= tau, e_j > 0},   S = sum_K e_j
    tok = smallest j in K whose inclusive prefix sum over K (index order) is > u_b * S, u_b = uniforms[b]
          (the last j in K when rounding leaves none)
    logprob = t_tok - log S,   entropy = log S - sum_K e_j t_j / S

A row with a NaN or +inf logit (or whose ``x * inv_T`` overflows to +inf), or with only -inf logits, has no
distribution: token -1, logprob and entropy NaN. -inf logits elsewhere just have e = 0 and are never drawn.
This is the contract of every backend (csrc/common/sample_params.h).

One program per row streams the row in BLOCK-column chunks and never materialises e: each pass reloads the
logits and recomputes ``e = exp(t)``, so memory is O(BLOCK) whatever V is. The passes:

1. ``m`` and the bad-row flag.
2. Thresholds, each only when its option is on (constexpr flags; the untruncated path skips them all).
   Both are a search for the largest ``v`` satisfying a predicate that is monotone in ``v``, done as a
   bisection on fp32 bit patterns: e >= 0, and non-negative floats order like their int32 bit patterns, so
   bisecting the integers in [0, bits(+inf)) visits every representable threshold and ends on an exact
   ``e`` value in at most 31 steps (one pass over the row each):
   top-k: ``count(e >= v) >= k``; top-p: ``sum_{e >= max(v, tau_k)} e >= top_p * S_k``.
   This is exact selection, not an approximation: the result equals what sorting would give, up to the fp32
   summation order of the top-p mass.
3. ``S`` (and the entropy sum ``sum_K e t``) over the kept set.
4. The inverse-CDF scan: a running prefix over blocks, kept in fp64 like the target ``u * S`` so that a long
   row's prefix does not drift by fp32 rounding; inside the crossing block, an fp32 ``tl.cumsum`` of the
   block's kept ``e`` added to the fp64 running prefix locates the first index past the target. Once the
   token is found the remaining blocks are skipped.

The logprob needs ``t`` of the drawn token only: one scalar reload of its logit at the end.

On GPUs ``tl.exp`` is ``ex2.approx``, so ``e`` (hence the thresholds and ``S``) can differ from a libm
``expf`` in the last bits; draws then differ from the CPU kernels only where ``u * S`` lies within that
rounding of a CDF boundary (or a top-p mass ties with ``top_p * S_k`` to fp32 rounding). In the
interpreter ``tl.exp`` is numpy's fp32 ``exp``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import check_block_v, device_context, row_block_v, row_num_warps

__all__ = ["sample_forward"]

# Bit pattern of fp32 +inf: an exclusive upper bound for every finite e >= 0. The bisection range
# [0, 0x7F800000) has fewer than 2^31 patterns, so 31 halvings always narrow it to one.
_INF_BITS = tl.constexpr(0x7F800000)
_BISECT_STEPS = tl.constexpr(31)


# ----------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _load_block(row_ptr, cols, V, inv_temperature, m):
    """``(e, t)`` for the columns ``cols`` of one row; columns past V give ``t = -inf``, ``e = 0``.

    ``t`` is one fused multiply-add, as in gather_logprobs and the C++ kernels, so the thresholds, the sums
    and the drawn token's logprob all see the same value.
    """
    x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    t = tl.fma(x, inv_temperature, -m)
    return tl.exp(t), t


@triton.jit
def _count_ge(row_ptr, V, inv_temperature, m, v, BLOCK: tl.constexpr):
    """``count(e_j >= v)`` over the row (int32: V < 2^31)."""
    offs = tl.arange(0, BLOCK)
    count = 0
    for start in range(0, V, BLOCK):
        e, _ = _load_block(row_ptr, start + offs, V, inv_temperature, m)
        count += tl.sum((e >= v).to(tl.int32), axis=0)
    return count


@triton.jit
def _mass_ge(row_ptr, V, inv_temperature, m, v, BLOCK: tl.constexpr):
    """``sum_{e_j >= v} e_j`` over the row, fp32."""
    offs = tl.arange(0, BLOCK)
    mass = 0.0
    for start in range(0, V, BLOCK):
        e, _ = _load_block(row_ptr, start + offs, V, inv_temperature, m)
        mass += tl.sum(tl.where(e >= v, e, 0.0), axis=0)
    return mass


# ----------------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _sample_fwd_kernel(
    tokens_ptr,
    logprobs_ptr,
    entropy_ptr,
    logits_ptr,
    uniforms_ptr,
    V,
    inv_temperature,
    top_k,
    top_p,
    min_p,
    BLOCK: tl.constexpr,
    TOP_K: tl.constexpr,
    TOP_P: tl.constexpr,
    MIN_P: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
):
    """One program per row.

    tokens_ptr: int64[B], logprobs_ptr: f32[B], entropy_ptr: f32[B] outputs (entropy only written when
    WITH_ENTROPY). logits_ptr: [B, V] contiguous; uniforms_ptr: f64[B]. top_k / top_p / min_p are only read
    when their flag is set.
    """
    row = tl.program_id(0).to(tl.int64)
    # int64 row offset: B * V passes 2^31 elements for e.g. 16k rows of a 152k vocabulary.
    row_ptr = logits_ptr + row * V
    offs = tl.arange(0, BLOCK)

    # Pass 1: the max of the rounded z, and whether the row has a NaN or +inf (tracked apart from the max:
    # how a max reduction treats NaN differs between the GPU and the interpreter).
    m = float("-inf")
    x_max = float("-inf")
    bad = 0
    for start in range(0, V, BLOCK):
        cols = start + offs
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        z = x * inv_temperature
        bad = tl.maximum(bad, tl.max(((z != z) | (z == float("inf"))).to(tl.int32), axis=0))
        m = tl.maximum(m, tl.max(z, axis=0))
        x_max = tl.maximum(x_max, tl.max(x, axis=0))
    if (bad != 0) | (m == float("-inf")):
        tl.store(tokens_ptr + row, -1)
        tl.store(logprobs_ptr + row, float("nan"))
        if WITH_ENTROPY:
            tl.store(entropy_ptr + row, float("nan"))
        return

    # Pass 2: thresholds in e-space. Each bisection keeps pred(lo) true and pred(hi) false.
    tau = tl.full((), 0.0, tl.float32)
    if TOP_K:
        # count(e >= 0) = V >= k holds at 0; count(e >= +inf) = 0 < k fails at +inf.
        lo = 0
        hi = _INF_BITS
        for _ in range(_BISECT_STEPS):
            mid = lo + (hi - lo) // 2
            ok = _count_ge(row_ptr, V, inv_temperature, m, mid.to(tl.float32, bitcast=True), BLOCK) >= top_k
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
        tau = lo.to(tl.float32, bitcast=True)
    if TOP_P:
        # The same summation as the bisection's at v = tau_k, so the predicate holds exactly at lo below.
        need = top_p * _mass_ge(row_ptr, V, inv_temperature, m, tau, BLOCK)
        # v <= tau_k gives the whole S_k >= top_p * S_k; +inf gives 0 < top_p * S_k (S_k >= 1 term > 0).
        lo = tau.to(tl.int32, bitcast=True)
        hi = _INF_BITS
        for _ in range(_BISECT_STEPS):
            mid = lo + (hi - lo) // 2
            v = tl.maximum(mid.to(tl.float32, bitcast=True), tau)
            ok = _mass_ge(row_ptr, V, inv_temperature, m, v, BLOCK) >= need
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
        tau = tl.maximum(tau, lo.to(tl.float32, bitcast=True))
    if MIN_P:
        # Relative to the max's own e, which the fused t puts within rounding of 1 (above or below): an
        # absolute min_p could exceed it and keep nothing.
        tau = tl.maximum(tau, min_p * tl.exp(tl.fma(x_max, inv_temperature, -m)))

    # Pass 3: S and the entropy numerator over the kept set.
    s = 0.0
    a = 0.0
    for start in range(0, V, BLOCK):
        e, t = _load_block(row_ptr, start + offs, V, inv_temperature, m)
        keep = (e >= tau) & (e > 0.0)
        s += tl.sum(tl.where(keep, e, 0.0), axis=0)
        if WITH_ENTROPY:
            # t zeroed outside the kept set before the multiply: e * t is 0 * (-inf) = NaN on -inf logits.
            a += tl.sum(e * tl.where(keep, t, 0.0), axis=0)

    # Pass 4: inverse CDF in index order. The target and the running prefix are fp64 (the uniform is fp64);
    # in-block prefixes are fp32 cumsums of at most BLOCK terms, added to the fp64 running prefix.
    target = tl.load(uniforms_ptr + row) * s.to(tl.float64)
    running = target * 0.0  # an fp64 zero
    token = -1
    last = -1
    for start in range(0, V, BLOCK):
        if token < 0:
            cols = start + offs
            e = _load_block(row_ptr, cols, V, inv_temperature, m)[0]
            keep = (e >= tau) & (e > 0.0)
            csum = tl.cumsum(tl.where(keep, e, 0.0), axis=0)
            prefix = running + csum.to(tl.float64)
            first = tl.min(tl.where(keep & (prefix > target), cols, V), axis=0)
            token = tl.where(first < V, first, token)
            last = tl.maximum(last, tl.max(tl.where(keep, cols, -1), axis=0))
            # The cumsum is non-decreasing, so its max is the block total: the next block's prefixes continue
            # exactly from this block's last one.
            running = running + tl.max(csum, axis=0).to(tl.float64)
    # Rounding (u * S past the prefix total) left no crossing: the last kept index.
    token = tl.where(token < 0, last, token)

    x_tok = tl.load(row_ptr + tl.maximum(token, 0)).to(tl.float32)
    log_s = tl.log(s)
    logprob = tl.fma(x_tok, inv_temperature, -m) - log_s
    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(logprobs_ptr + row, tl.where(token >= 0, logprob, float("nan")))
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(token >= 0, log_s - a / s, float("nan")))


# ----------------------------------------------------------------------------------------------------------
# Host wrapper
# ----------------------------------------------------------------------------------------------------------


def sample_forward(
    logits: torch.Tensor,
    uniforms: torch.Tensor,
    inv_temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    with_entropy: bool,
    *,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one token per row of ``softmax(logits * inv_temperature)`` truncated by top-k / top-p / min-p.

    Args:
        logits: ``[B, V]`` contiguous float32 / bfloat16 / float16.
        uniforms: ``f64[B]`` contiguous, each in ``[0, 1)``: the draw of each row (inverse CDF).
        inv_temperature: ``1 / temperature`` (> 0).
        top_k: keep the ``top_k`` most likely tokens (ties counted); 0 or >= V for no top-k.
        top_p: keep the smallest most-likely set with at least this share of the top-k mass; 1 for none.
        min_p: keep tokens with probability >= ``min_p`` times the largest; 0 for none.
        with_entropy: also return the entropy of each row's truncated distribution.
        block_v: vocabulary block per loop step (power of two; None = automatic). Mainly for tests.

    Returns:
        ``(tokens i64[B], logprobs f32[B], entropy f32[B])``, ``entropy`` being ``f32[0]`` without
        ``with_entropy``. Rows with no distribution (a NaN or +inf logit, or only -inf) get token -1 and NaN.
    """
    if logits.dim() != 2 or not logits.is_contiguous():
        raise ValueError(f"logits must be contiguous 2-D [B, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    n_rows, n_cols = logits.shape
    if uniforms.shape != (n_rows,) or uniforms.dtype != torch.float64 or not uniforms.is_contiguous():
        raise ValueError(
            f"uniforms must be contiguous float64 [B={n_rows}], got {uniforms.dtype} {tuple(uniforms.shape)}"
        )
    if uniforms.device != logits.device:
        raise ValueError(f"uniforms are on {uniforms.device} but logits on {logits.device}")
    check_block_v(block_v)

    device = logits.device
    tokens = torch.empty(n_rows, dtype=torch.int64, device=device)
    logprobs = torch.empty(n_rows, dtype=torch.float32, device=device)
    entropy = torch.empty(n_rows if with_entropy else 0, dtype=torch.float32, device=device)
    if n_rows == 0:
        return tokens, logprobs, entropy
    if n_cols == 0:
        raise ValueError("logits must have at least one vocabulary column")

    top_k = int(top_k)
    top_p = float(top_p)
    min_p = float(min_p)
    use_top_k = 0 < top_k < n_cols
    use_top_p = top_p < 1.0
    use_min_p = min_p > 0.0
    bv = block_v or row_block_v(n_cols)
    with device_context(logits):
        _sample_fwd_kernel[(n_rows,)](
            tokens,
            logprobs,
            entropy if with_entropy else logprobs,  # unused slot when WITH_ENTROPY is false
            logits,
            uniforms,
            n_cols,
            float(inv_temperature),
            # Unused options get neutral values: the kernel skips them via the flags.
            top_k if use_top_k else 0,
            top_p if use_top_p else 1.0,
            min_p if use_min_p else 0.0,
            BLOCK=bv,
            TOP_K=use_top_k,
            TOP_P=use_top_p,
            MIN_P=use_min_p,
            WITH_ENTROPY=with_entropy,
            num_warps=row_num_warps(bv),
        )
    return tokens, logprobs, entropy
