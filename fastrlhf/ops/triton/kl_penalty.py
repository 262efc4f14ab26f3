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

__all__ = ["kl_penalty_backward", "kl_penalty_forward"]

# Elements per program: 1024 over 4 warps is 8 per thread, one 16-byte load per input in bf16 (two in fp32).
_BLOCK = 1024
_NUM_WARPS = 4

# Estimator codes, as the caller passes them.
K1, K2, K3, ABS = 0, 1, 2, 3


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
def _kl_penalty_bwd_kernel(
    dlogprobs_ptr,
    grad_ptr,
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

    dlogprobs_ptr: f32[M] output; grad_ptr: f32[M] upstream gradient of kl; other inputs as in the forward.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n_elements
    g = tl.load(grad_ptr + offs, mask=inb, other=0.0)
    logp = tl.load(logprobs_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    ref = tl.load(ref_logprobs_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    dlogp = g * _kl_grad(logp - ref, clamp, ESTIMATOR, HAS_CLAMP)
    if HAS_MASK:
        valid = tl.load(mask_ptr + offs, mask=inb, other=0) != 0
        dlogp = tl.where(valid, dlogp, 0.0)
    tl.store(dlogprobs_ptr + offs, dlogp, mask=inb)


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


def kl_penalty_backward(
    grad: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor | None,
    estimator: int,
    clamp: float,
    *,
    block: int | None = None,
) -> torch.Tensor:
    """Gradient of ``sum(grad * kl)`` w.r.t. ``logprobs`` (w.r.t. ``ref_logprobs`` it is the negative).

    Args:
        grad: ``f32[M]`` upstream gradient (made contiguous fp32 here: autograd may hand in an expanded one).
        logprobs, ref_logprobs, mask, estimator, clamp: as given to the forward.
        block: elements per program (power of two; None = automatic). Mainly for tests.

    Returns:
        ``f32[M]``: ``grad * dkl/dd``, 0 where masked or where the clamp is active.
    """
    mask, clamp, has_clamp = _prepare(logprobs, ref_logprobs, mask, estimator, clamp)
    n = logprobs.numel()
    assert grad.numel() == n
    dlogp = torch.empty(n, dtype=torch.float32, device=logprobs.device)
    if n == 0:
        return dlogp
    grad = grad.reshape(n).to(torch.float32).contiguous()
    bs = block or _BLOCK
    with device_context(logprobs):
        _kl_penalty_bwd_kernel[(triton.cdiv(n, bs),)](
            dlogp,
            grad,
            logprobs,
            ref_logprobs,
            mask if mask is not None else logprobs,
            n,
            clamp,
            BLOCK=bs,
            ESTIMATOR=estimator,
            HAS_MASK=mask is not None,
            HAS_CLAMP=has_clamp,
            num_warps=_NUM_WARPS,
        )
    return dlogp
