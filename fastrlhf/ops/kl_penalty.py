"""kl_penalty: per-token KL estimate between the policy and the reference, fused forward and backward.

With ``d = logprobs - ref_logprobs``: ``k1 = d``, ``k2 = d²/2``, ``k3 = exp(-d) + d - 1``, ``abs = |d|``
(see ``reference.kl_penalty``). One elementwise kernel per direction on every backend.

The cpp and cuda backends run the TORCH_LIBRARY op ``torch.ops.fastrlhf.kl_penalty`` (csrc/kl_penalty_op.cpp):
checks, the seq-mean / token-mean reduction and the autograd formula are C++, so a call costs little more
than the dispatcher. The Triton backend runs two Python custom ops: the per-token estimate, and its mean
(``kl_penalty_mean``), reduced in the kernels with the shared epilogue of ops/triton/reduce.py. Either
way the backward is one kernel that reads the upstream gradient as it comes (one value, per row or per
token), divides by the forward's normalizer and writes both inputs' gradients.
"""

from __future__ import annotations

import math

import torch

from fastrlhf.ops import reference
from fastrlhf.ops._backend import COMPILED_OP_BACKENDS, pick_backend, runs_compiled_op
from fastrlhf.ops._compiled import CompiledOp
from fastrlhf.ops._dispatch import kernel_op
from fastrlhf.ops._kernels import kernel_module, optional_mask
from fastrlhf.ops._validation import (
    FLOAT_DTYPES,
    check_mask,
    check_same_device,
    check_same_shape,
    check_tensor,
)

ESTIMATORS = {"k1": 0, "k2": 1, "k3": 2, "abs": 3}
REDUCTIONS = ("none", "seq-mean", "token-mean")
# The Triton ops' ``rows`` argument: a seq-mean's row count (>= 0), or one of these.
_TOKEN_MEAN_ROWS, _PER_TOKEN_ROWS = -1, -2

_KL_PENALTY = CompiledOp("kl_penalty")


def check_estimator(estimator: str) -> int:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is not one of {tuple(ESTIMATORS)}")
    return ESTIMATORS[estimator]


def check_clamp(clamp, name: str = "clamp") -> float:
    """None → +inf (no bound); otherwise a positive number (it bounds a value to [-clamp, clamp]).
    ``name`` is the argument's name in the error."""
    if clamp is None:
        return math.inf
    try:
        value = float(clamp)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be None or a positive number, got {clamp!r}") from None
    if math.isnan(value) or value <= 0:
        raise ValueError(f"{name} must be None or a positive number, got {value}")
    return value


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    estimator: str = "k1",
    clamp: float | None = None,
    reduction: str = "none",
    backend: str = "auto",
) -> torch.Tensor:
    """Per-token KL estimate, with gradients to both inputs.

    Args:
        logprobs, ref_logprobs: ``[B, T]`` (any matching shape) float32 / bfloat16 / float16.
        mask: 0/1 (or bool) of the same shape, or None; masked positions give 0 and no gradient.
        estimator: "k1", "k2", "k3" or "abs".
        clamp: bound the estimate to ``[-clamp, clamp]`` (gradient 0 where it binds), or None.
        reduction: "none" (per token, the input's shape), "seq-mean" (masked mean over the last dim,
            shape ``[B]``), or "token-mean" (masked mean over every token, a scalar).
    Returns:
        float32 (float64 for float64 input) KL of the shape the reduction gives.
    """
    if runs_compiled_op(backend, logprobs, ref_logprobs, mask):
        try:
            return _KL_PENALTY(logprobs, ref_logprobs, mask, estimator, clamp, reduction)[0]
        except TypeError:  # an argument of a type the schema does not take: the checks below name it
            pass
    check_tensor("logprobs", logprobs, FLOAT_DTYPES)
    check_tensor("ref_logprobs", ref_logprobs, FLOAT_DTYPES)
    check_same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs, mask=mask)
    device = check_same_device(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    code = check_estimator(estimator)
    clamp_value = check_clamp(clamp)
    clamp = None if clamp is None else clamp_value  # a number given as a str, say, goes on as a float
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}")
    if reduction == "seq-mean" and logprobs.dim() == 0:
        raise ValueError("reduction='seq-mean' needs logprobs with a sequence dimension, got a scalar")
    mask_u8 = None if mask is None else check_mask("mask", mask)

    chosen = pick_backend(backend, device, dict(logprobs=logprobs, ref_logprobs=ref_logprobs))
    if chosen in COMPILED_OP_BACKENDS.values():
        return _KL_PENALTY(logprobs, ref_logprobs, mask, estimator, clamp, reduction)[0]
    if chosen == "torch":
        kl = reference.kl_penalty(logprobs, ref_logprobs, mask_u8, estimator, clamp)
        return _reduce(kl, mask_u8, reduction)
    if ref_logprobs.dtype != logprobs.dtype:  # one kernel dtype: widen both rather than round one
        logprobs, ref_logprobs = logprobs.float(), ref_logprobs.float()
    flat_mask = logprobs.new_empty(0, dtype=torch.uint8) if mask_u8 is None else mask_u8.reshape(-1)
    flat = (logprobs.reshape(-1).contiguous(), ref_logprobs.reshape(-1).contiguous(), flat_mask.contiguous())
    if reduction == "none":
        return _forward_op(*flat, code, clamp_value, chosen).view(logprobs.shape)
    rows = math.prod(logprobs.shape[:-1]) if reduction == "seq-mean" else _TOKEN_MEAN_ROWS
    mean, _normalizer = _mean_op(*flat, code, clamp_value, rows, chosen)
    return mean.view(logprobs.shape[:-1]) if reduction == "seq-mean" else mean


def _reduce(kl: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """The torch backend's reduction of its per-token estimate (the kernels reduce their own)."""
    if reduction == "none":
        return kl
    weights = torch.ones_like(kl) if mask is None else mask.to(kl.dtype)
    if reduction == "seq-mean":
        # A sequence with no valid token has mean 0, not NaN.
        return (kl * weights).sum(-1) / weights.sum(-1).clamp_min(1)
    return (kl * weights).sum() / weights.sum().clamp_min(1)


# The Triton backend's custom ops (the compiled backends have the C++ op above).
@kernel_op("fastrlhf::kl_penalty_fwd")
def _forward_op(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    estimator: int,
    clamp: float,
    backend: str,
) -> torch.Tensor:
    """logprobs, ref_logprobs ``[M]`` (one dtype), mask uint8 ``[M]`` or ``[0]`` → kl float32 ``[M]``."""
    module = kernel_module(backend, "kl_penalty")
    return module.kl_penalty_forward(logprobs, ref_logprobs, optional_mask(backend, mask), estimator, clamp)


@_forward_op.register_fake
def _(logprobs, ref_logprobs, mask, estimator, clamp, backend):
    return logprobs.new_empty(logprobs.shape, dtype=torch.float32)


@kernel_op("fastrlhf::kl_penalty_mean_fwd")
def _mean_op(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    estimator: int,
    clamp: float,
    rows: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked mean over each of ``rows`` equal rows of the flat ``[M]`` inputs ("seq-mean"), or over
    every token (``rows=_TOKEN_MEAN_ROWS``) → (mean, normalizer) float32, ``[rows]`` or 0-dim each."""
    module = kernel_module(backend, "kl_penalty")
    per_row = None if rows == _TOKEN_MEAN_ROWS else rows
    mask_or_none = optional_mask(backend, mask)
    return module.kl_penalty_mean(logprobs, ref_logprobs, mask_or_none, estimator, clamp, per_row)


@_mean_op.register_fake
def _(logprobs, ref_logprobs, mask, estimator, clamp, rows, backend):
    shape = () if rows < 0 else (rows,)
    return logprobs.new_empty(shape, dtype=torch.float32), logprobs.new_empty(shape, dtype=torch.float32)


@kernel_op("fastrlhf::kl_penalty_bwd")
def _backward_op(
    grad: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    normalizer: torch.Tensor,
    estimator: int,
    clamp: float,
    rows: int,
    ref_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d logprobs, d ref_logprobs), float32 ``[M]`` each (the second ``[0]`` unless ``ref_grad``), of
    ``Σ grad · out``: ``out`` the per-token kl (``rows=_PER_TOKEN_ROWS``, ``normalizer`` unread), or
    ``_mean_op``'s mean with its normalizer and ``rows``."""
    module = kernel_module(backend, "kl_penalty")
    d_logprobs, d_ref = module.kl_penalty_backward(
        grad,
        logprobs,
        ref_logprobs,
        optional_mask(backend, mask),
        estimator,
        clamp,
        normalizer=None if rows == _PER_TOKEN_ROWS else normalizer,
        rows=rows if rows >= 0 else None,
        ref_grad=ref_grad,
    )
    return d_logprobs, d_ref if d_ref is not None else d_logprobs.new_empty(0)


@_backward_op.register_fake
def _(grad, logprobs, ref_logprobs, mask, normalizer, estimator, clamp, rows, ref_grad, backend):
    n = logprobs.numel()
    f32 = dict(dtype=torch.float32)
    return logprobs.new_empty(n, **f32), logprobs.new_empty(n if ref_grad else 0, **f32)


def _input_gradients(ctx, grad, normalizer, rows):
    """The autograd formulas' common part: both inputs' gradients from one backward kernel."""
    logprobs, ref_logprobs, mask = ctx.saved_tensors[:3]
    estimator, clamp, backend = ctx.options
    ref_grad = ctx.needs_input_grad[1]
    grad = grad.to(torch.float32)
    d_logprobs, d_ref = _backward_op(
        grad, logprobs, ref_logprobs, mask, normalizer, estimator, clamp, rows, ref_grad, backend
    )
    return d_logprobs.to(logprobs.dtype), d_ref.to(ref_logprobs.dtype) if ref_grad else None


def _setup_context(ctx, inputs, output):
    logprobs, ref_logprobs, mask, estimator, clamp, backend = inputs
    ctx.save_for_backward(logprobs, ref_logprobs, mask)
    ctx.options = (estimator, clamp, backend)


def _backward(ctx, grad):
    no_normalizer = grad.new_empty(0, dtype=torch.float32)
    d_logprobs, d_ref = _input_gradients(ctx, grad, no_normalizer, rows=_PER_TOKEN_ROWS)
    return d_logprobs, d_ref, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _mean_setup_context(ctx, inputs, output):
    logprobs, ref_logprobs, mask, estimator, clamp, rows, backend = inputs
    ctx.save_for_backward(logprobs, ref_logprobs, mask, output[1])
    ctx.options = (estimator, clamp, backend)
    ctx.rows = rows
    ctx.mark_non_differentiable(output[1])
    # The normalizer takes no gradient: no zero tensor (a fill launch on a GPU) is made to stand in for it.
    ctx.set_materialize_grads(False)


def _mean_backward(ctx, grad_mean, _grad_normalizer):
    if grad_mean is None:
        return None, None, None, None, None, None, None
    normalizer = ctx.saved_tensors[3]
    d_logprobs, d_ref = _input_gradients(ctx, grad_mean, normalizer, ctx.rows)
    return d_logprobs, d_ref, None, None, None, None, None


_mean_op.register_autograd(_mean_backward, setup_context=_mean_setup_context)
