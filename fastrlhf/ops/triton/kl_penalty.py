"""Per-token KL penalty estimators and their gradient, in Triton.

With ``d = logprobs - ref_logprobs`` (the log-ratio of policy to reference at the sampled token):

    estimator 0, k1:  kl = d                               dkl/dd = 1
    estimator 1, k2:  kl = d² / 2                          dkl/dd = d
    estimator 2, k3:  kl = e^{-d} - 1 + d = expm1(-d) + d  dkl/dd = 1 - e^{-d}
    estimator 3, abs: kl = |d|                             dkl/dd = sign(d)  (0 at d = 0)

``clamp`` bounds the estimate to ``[-clamp, clamp]``; where it is active (``|kl| > clamp``) the gradient is 0.
Masked positions give 0 and get gradient 0. The gradient w.r.t. ``ref_logprobs`` is minus the one w.r.t.
``logprobs``; the caller negates it.

k3 is a difference of nearly equal terms near ``d = 0`` (``kl ≈ d²/2``); Triton has no ``expm1``, so for
``|d| < 0.5`` it is evaluated as its Taylor series (see ``_k3``), which keeps fp32 relative precision down to
the smallest gaps. The bound and the series are the C++/CUDA kernels' (``kK3SeriesBound`` and ``k3_series``
in ``csrc/common/kl.h``), so every backend evaluates k3 the same way. Everything is computed in fp32
whatever the input dtype.

k3's ``e^{-d}`` and its gradient's go through ``exp_accurate`` (libdevice's expf on a GPU): ``tl.exp``
there is ``ex2.approx(d * log2 e)``, whose relative error grows like ``|d| * 2^-24`` (5e-6 at |d| = 88).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._utils import device_context, exp_accurate
from .reduce import mean_of_sums

__all__ = ["kl_penalty_backward", "kl_penalty_forward", "kl_penalty_mean"]

# Elements per program: 1024 over 4 warps is 8 per thread, one 16-byte load per input in bf16 (two in fp32).
_BLOCK = 1024
_NUM_WARPS = 4

# Estimator codes, as the caller passes them.
K1, K2, K3, ABS = 0, 1, 2, 3
# The means' kernel walks its segment (a row, or a token-mean span) 4096 tokens a step over 8 warps: 16
# tokens a thread, 32 KB of fp32 loads in flight per program. A GPU needs megabytes in flight to stream at
# full bandwidth, and a mean launches one program per row (256 at B=256) or per span; not yet measured on one.
_SUMS_BLOCK = 4096
_SUMS_NUM_WARPS = 8
# Tokens per token-mean span: each program sums one, then reduce.mean_of_sums adds the spans in index
# order, so the result does not depend on the launch. 2M tokens make 256 programs, enough to fill the SMs.
_TOKEN_MEAN_SEGMENT = 8192
# How the backward reads its upstream gradient, and what it divides it by.
GRAD_SCALAR, GRAD_PER_ROW, GRAD_PER_TOKEN = 0, 1, 2
NORM_NONE, NORM_SCALAR, NORM_PER_ROW = 0, 1, 2


# ----------------------------------------------------------------------------------------------------------
# Device helpers (also used by the fused advantages kernel)
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _k3(d):
    """``expm1(-d) + d`` in fp32, >= 0, accurate to fp32 relative precision for all gaps (finite for d > -88).

    For ``|d| < 0.5``: ``sum_{n>=2} (-d)^n / n!`` through n = 9, whose first dropped term is below 3e-9 of
    the sum. Elsewhere ``(e^{-d} - 1) + d`` cancels at most ~2 bits. The bound and the series are those of
    ``csrc/common/kl.h`` (``kK3SeriesBound``, ``k3_series``).
    """
    x = -d
    # Horner form of x² (1/2! + x/3! + x²/4! + ... + x⁷/9!).
    p = 1.0 / 362880.0
    p = p * x + 1.0 / 40320.0
    p = p * x + 1.0 / 5040.0
    p = p * x + 1.0 / 720.0
    p = p * x + 1.0 / 120.0
    p = p * x + 1.0 / 24.0
    p = p * x + 1.0 / 6.0
    p = p * x + 0.5
    series = p * x * x
    direct = (exp_accurate(x) - 1.0) + d
    k3 = tl.where(tl.abs(d) < 0.5, series, direct)
    # The true value is >= 0; rounding of the direct form must not make it negative.
    return tl.maximum(k3, 0.0)


@triton.jit
def _kl_unclamped(d, ESTIMATOR: tl.constexpr):
    """KL estimate from the fp32 log-ratio ``d`` (any shape), before clamping."""
    if ESTIMATOR == 0:
        kl = d
    elif ESTIMATOR == 1:
        kl = 0.5 * d * d
    elif ESTIMATOR == 2:
        kl = _k3(d)
    else:
        kl = tl.abs(d)
    return kl


@triton.jit
def _clamped_gap(d, clamp, ESTIMATOR: tl.constexpr, HAS_CLAMP: tl.constexpr):
    """Under a clamp, k3's gap is capped at clamp + 1: past it k3 > clamp already, so a -inf log-prob gives
    the clamp and a 0 gradient, not inf - inf (csrc/common/kl.h: kl_gap)."""
    if HAS_CLAMP and ESTIMATOR == 2:
        d = tl.maximum(d, -(clamp + 1.0))
    return d


@triton.jit
def _kl_value(d, clamp, ESTIMATOR: tl.constexpr, HAS_CLAMP: tl.constexpr):
    """Clamped KL estimate from the fp32 log-ratio ``d``; ``clamp`` is only read when HAS_CLAMP."""
    d = _clamped_gap(d, clamp, ESTIMATOR, HAS_CLAMP)
    kl = _kl_unclamped(d, ESTIMATOR)
    if HAS_CLAMP:
        kl = tl.minimum(tl.maximum(kl, -clamp), clamp)
    return kl


@triton.jit
def _kl_grad(d, clamp, ESTIMATOR: tl.constexpr, HAS_CLAMP: tl.constexpr):
    """``d kl / d logprobs`` at the fp32 log-ratio ``d``, 0 where the clamp is active."""
    d = _clamped_gap(d, clamp, ESTIMATOR, HAS_CLAMP)
    if ESTIMATOR == 0:
        g = tl.full(d.shape, 1.0, tl.float32)
    elif ESTIMATOR == 1:
        g = d
    elif ESTIMATOR == 2:
        # 1 - e^{-d} = -expm1(-d) = d - k3: no cancellation for |d| < 0.5, where e^{-d} - 1 would lose digits.
        g = tl.where(tl.abs(d) < 0.5, d - _k3(d), 1.0 - exp_accurate(-d))
    else:
        g = tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, 0.0))
    if HAS_CLAMP:
        g = tl.where(tl.abs(_kl_unclamped(d, ESTIMATOR)) > clamp, 0.0, g)
    return g


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _kl_penalty_fwd_kernel(
    kl_ptr,
    logprobs_ptr,
    ref_logprobs_ptr,
    mask_ptr,
    n_elements,
    clamp,
    BLOCK: tl.constexpr,
    ESTIMATOR: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
):
    """One program per BLOCK elements.

    kl_ptr: f32[M] output. logprobs_ptr, ref_logprobs_ptr: [M] contiguous, same float dtype;
    mask_ptr: uint8[M] (only read when HAS_MASK).
    """
    # int64 offsets: a flattened [B, T] batch can pass 2^31 tokens.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n_elements
    logp = tl.load(logprobs_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    ref = tl.load(ref_logprobs_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    kl = _kl_value(logp - ref, clamp, ESTIMATOR, HAS_CLAMP)
    if HAS_MASK:
        valid = tl.load(mask_ptr + offs, mask=inb, other=0) != 0
        # where, not a multiply: padding may hold -inf logprobs whose kl is NaN.
        kl = tl.where(valid, kl, 0.0)
    tl.store(kl_ptr + offs, kl, mask=inb)


@triton.jit
def _kl_penalty_sums_kernel(
    sums_ptr,
    counts_ptr,
    logprobs_ptr,
    ref_logprobs_ptr,
    mask_ptr,
    n_elements,
    segment_len,
    clamp,
    BLOCK: tl.constexpr,
    ESTIMATOR: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    MEAN: tl.constexpr,
):
    """One program per segment of ``segment_len`` consecutive tokens, walked BLOCK at a time.

    MEAN (seq-mean: a segment is a row): sums_ptr[seg] = the mean of the row's kept tokens (0 for none),
    counts_ptr[seg] = its normalizer max(kept, 1), both f32. Otherwise (token-mean's fixed segments):
    sums_ptr[seg] = Σ kl over the kept tokens (f32), counts_ptr[seg] = how many (int32), for mean_of_sums.
    Inputs as in the forward kernel.
    """
    segment = tl.program_id(0).to(tl.int64)
    start = segment * segment_len
    total = tl.zeros([BLOCK], dtype=tl.float32)
    kept = tl.zeros([BLOCK], dtype=tl.int32)
    for step in range(0, segment_len, BLOCK):
        local = step + tl.arange(0, BLOCK)
        offs = start + local
        inb = (local < segment_len) & (offs < n_elements)
        logp = tl.load(logprobs_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        ref = tl.load(ref_logprobs_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        kl = _kl_value(logp - ref, clamp, ESTIMATOR, HAS_CLAMP)
        valid = inb
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + offs, mask=inb, other=0) != 0)
        # where, not a multiply: padding may hold -inf logprobs whose kl is NaN.
        total += tl.where(valid, kl, 0.0)
        kept += valid.to(tl.int32)
    row_sum = tl.sum(total, axis=0)
    count = tl.sum(kept, axis=0)
    if MEAN:
        normalizer = tl.maximum(count, 1).to(tl.float32)
        tl.store(sums_ptr + segment, row_sum / normalizer)
        tl.store(counts_ptr + segment, normalizer)
    else:
        tl.store(sums_ptr + segment, row_sum)
        tl.store(counts_ptr + segment, count)


@triton.jit
def _kl_penalty_bwd_kernel(
    dlogprobs_ptr,
    dref_ptr,
    grad_ptr,
    normalizer_ptr,
    logprobs_ptr,
    ref_logprobs_ptr,
    mask_ptr,
    n_elements,
    row_len,
    clamp,
    BLOCK: tl.constexpr,
    ESTIMATOR: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    GRAD_KIND: tl.constexpr,
    NORM_KIND: tl.constexpr,
    HAS_DREF: tl.constexpr,
):
    """One program per BLOCK elements.

    dlogprobs_ptr: f32[M] output; dref_ptr: f32[M] output, -dlogprobs (only written when HAS_DREF).
    grad_ptr: the upstream gradient: one value for every token (GRAD_KIND 0, a scalar's or an expanded
    one's), one per row of ``row_len`` tokens (1: seq-mean), or one per token (2). normalizer_ptr: what the
    forward's mean divided by: nothing (NORM_KIND 0), one value (1: token-mean) or one per row (2:
    seq-mean); the gradient is divided by it here, on the device. Other inputs as in the forward.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n_elements
    if GRAD_KIND == 0:
        g = tl.load(grad_ptr).to(tl.float32)
    elif GRAD_KIND == 1:
        g = tl.load(grad_ptr + offs // row_len, mask=inb, other=0.0).to(tl.float32)
    else:
        g = tl.load(grad_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    if NORM_KIND == 1:
        g = g / tl.load(normalizer_ptr)
    elif NORM_KIND == 2:
        # Only a seq-mean pays for the per-token division that finds each token's row.
        g = g / tl.load(normalizer_ptr + offs // row_len, mask=inb, other=1.0)
    logp = tl.load(logprobs_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    ref = tl.load(ref_logprobs_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    dlogp = g * _kl_grad(logp - ref, clamp, ESTIMATOR, HAS_CLAMP)
    if HAS_MASK:
        valid = tl.load(mask_ptr + offs, mask=inb, other=0) != 0
        dlogp = tl.where(valid, dlogp, 0.0)
    tl.store(dlogprobs_ptr + offs, dlogp, mask=inb)
    if HAS_DREF:
        tl.store(dref_ptr + offs, -dlogp, mask=inb)


# ----------------------------------------------------------------------------------------------------------
# Host wrappers
# ----------------------------------------------------------------------------------------------------------


def _prepare(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor | None,
    estimator: int,
    clamp: float,
):
    assert logprobs.dim() == 1 and logprobs.is_contiguous(), "logprobs must be contiguous 1-D"
    assert ref_logprobs.shape == logprobs.shape and ref_logprobs.dtype == logprobs.dtype
    assert ref_logprobs.is_contiguous()
    assert estimator in (K1, K2, K3, ABS), f"unknown estimator code {estimator}"
    if mask is not None:
        assert mask.shape == logprobs.shape and mask.is_contiguous()
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)  # same bytes; Triton loads bool pointers as int1
        assert mask.dtype == torch.uint8
    clamp = float(clamp)
    has_clamp = not math.isinf(clamp)
    # The clamp slot must hold a finite fp32 when unused; the kernels skip it via HAS_CLAMP.
    return mask, (clamp if has_clamp else 0.0), has_clamp


def kl_penalty_forward(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor | None,
    estimator: int,
    clamp: float,
    *,
    block: int | None = None,
) -> torch.Tensor:
    """Per-token KL estimate between policy and reference.

    Args:
        logprobs, ref_logprobs: ``[M]`` contiguous, same dtype (float32 / bfloat16 / float16).
        mask: ``uint8[M]`` (0 = skip) or None for no mask.
        estimator: 0 = k1, 1 = k2, 2 = k3, 3 = abs (see the module docstring).
        clamp: bound on ``|kl|``; ``float('inf')`` for none.
        block: elements per program (power of two; None = automatic). Mainly for tests.

    Returns:
        ``kl f32[M]``, 0 at masked positions.
    """
    mask, clamp, has_clamp = _prepare(logprobs, ref_logprobs, mask, estimator, clamp)
    n = logprobs.numel()
    kl = torch.empty(n, dtype=torch.float32, device=logprobs.device)
    if n == 0:
        return kl
    bs = block or _BLOCK
    with device_context(logprobs):
        _kl_penalty_fwd_kernel[(triton.cdiv(n, bs),)](
            kl,
            logprobs,
            ref_logprobs,
            mask if mask is not None else logprobs,  # unused slot when HAS_MASK is false
            n,
            clamp,
            BLOCK=bs,
            ESTIMATOR=estimator,
            HAS_MASK=mask is not None,
            HAS_CLAMP=has_clamp,
            num_warps=_NUM_WARPS,
        )
    return kl


def kl_penalty_mean(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor | None,
    estimator: int,
    clamp: float,
    rows: int | None,
    *,
    block: int | None = None,
    segment: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked mean of the KL estimate per row ("seq-mean": the inputs are ``rows`` rows of equal
    length, flattened), or over every token (``rows=None``: "token-mean"), reduced in the kernels: no
    per-token output is written.

    Args:
        logprobs, ref_logprobs, mask, estimator, clamp: as in ``kl_penalty_forward``.
        rows: the number of rows (``M`` a multiple of it, or 0 tokens), or None for one mean.
        block: elements per loop step (power of two; None = automatic). segment: token-mean's tokens per
            program (None = 8192). Both mainly for tests.
    Returns:
        ``(mean, normalizer)`` f32, each ``[rows]`` or 0-dim: the mean over the kept tokens (0 where none
        is kept), and what it divided by (the kept count, at least 1), which the backward takes.
    """
    mask, clamp, has_clamp = _prepare(logprobs, ref_logprobs, mask, estimator, clamp)
    n = logprobs.numel()
    per_row = rows is not None
    if per_row:
        assert rows >= 0 and (n == 0 or (rows > 0 and n % rows == 0)), "logprobs must hold whole rows"
        n_segments, segment_len = rows, (n // rows if rows else 0)
    else:
        segment_len = segment or _TOKEN_MEAN_SEGMENT
        n_segments = triton.cdiv(n, segment_len)
    sums = torch.empty(n_segments, dtype=torch.float32, device=logprobs.device)
    counts = torch.empty(n_segments, dtype=torch.float32 if per_row else torch.int32, device=logprobs.device)
    if n_segments:
        with device_context(logprobs):
            _kl_penalty_sums_kernel[(n_segments,)](
                sums,
                counts,
                logprobs,
                ref_logprobs,
                mask if mask is not None else logprobs,  # unused slot when HAS_MASK is false
                n,
                segment_len,
                clamp,
                BLOCK=block or _SUMS_BLOCK,
                ESTIMATOR=estimator,
                HAS_MASK=mask is not None,
                HAS_CLAMP=has_clamp,
                MEAN=per_row,
                num_warps=_SUMS_NUM_WARPS,
            )
    if per_row:
        return sums, counts
    mean, _, normalizer, _ = mean_of_sums(sums, counts)
    return mean, normalizer


def _grad_layout(grad: torch.Tensor, n: int, rows: int) -> tuple[torch.Tensor, int]:
    """The upstream gradient as the backward kernel reads it, and its GRAD_KIND: one value when every
    element is the same one (a scalar, or autograd's expansion of one after ``.sum()``: read once, never
    materialised), else one per row (``rows`` of them) or one per token (``n``), contiguous."""
    sizes_and_strides = zip(grad.shape, grad.stride(), strict=True)
    if grad.numel() == 1 or all(stride == 0 for size, stride in sizes_and_strides if size > 1):
        return grad.as_strided((1,), (1,)), GRAD_SCALAR
    flat = grad.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if flat.numel() == n:
        return flat, GRAD_PER_TOKEN
    assert flat.numel() == rows, f"a gradient of {flat.numel()} values for {n} tokens in {rows} rows"
    return flat, GRAD_PER_ROW


def kl_penalty_backward(
    grad: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor | None,
    estimator: int,
    clamp: float,
    *,
    normalizer: torch.Tensor | None = None,
    rows: int | None = None,
    ref_grad: bool = False,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of ``sum(grad * out)`` for the per-token KL (``normalizer=None``) or its mean.

    Args:
        grad: the upstream gradient of the output: per token ``[M]``, per row ``[rows]`` for "seq-mean",
            a scalar for "token-mean"; an expanded (stride-0) one is read as one value.
        logprobs, ref_logprobs, mask, estimator, clamp: as given to the forward.
        normalizer: ``kl_penalty_mean``'s normalizer (per row with ``rows``, else 0-dim), or None.
        rows: the number of rows for "seq-mean" (as given to ``kl_penalty_mean``); None otherwise.
        ref_grad: also write the gradient w.r.t. ``ref_logprobs`` (the negation), in the same pass.
        block: elements per program (power of two; None = automatic). Mainly for tests.
    Returns:
        ``(d logprobs f32[M], d ref_logprobs f32[M] or None)``: 0 where masked or where the clamp is active.
    """
    mask, clamp, has_clamp = _prepare(logprobs, ref_logprobs, mask, estimator, clamp)
    n = logprobs.numel()
    dlogp = torch.empty(n, dtype=torch.float32, device=logprobs.device)
    dref = torch.empty(n, dtype=torch.float32, device=logprobs.device) if ref_grad else None
    if n == 0:
        return dlogp, dref
    row_len = n // rows if rows else n  # rows > 0 here: n > 0 tokens fill them
    grad, grad_kind = _grad_layout(grad, n, rows or 1)
    if normalizer is None:
        norm_kind = NORM_NONE
    else:
        norm_kind = NORM_PER_ROW if rows is not None else NORM_SCALAR
        normalizer = normalizer.reshape(-1).contiguous()
    bs = block or _BLOCK
    with device_context(logprobs):
        _kl_penalty_bwd_kernel[(triton.cdiv(n, bs),)](
            dlogp,
            dref if dref is not None else dlogp,  # unused slots when their flag is off
            grad,
            normalizer if normalizer is not None else grad,
            logprobs,
            ref_logprobs,
            mask if mask is not None else logprobs,
            n,
            row_len,
            clamp,
            BLOCK=bs,
            ESTIMATOR=estimator,
            HAS_MASK=mask is not None,
            HAS_CLAMP=has_clamp,
            GRAD_KIND=grad_kind,
            NORM_KIND=norm_kind,
            HAS_DREF=ref_grad,
            num_warps=_NUM_WARPS,
        )
    return dlogp, dref
