"""gather_logprobs: fused log-softmax + gather (+ entropy) over the vocabulary.

Layers, from the user down:
    gather_logprobs()                 backend choice; for torch / triton also validation and flattening
    cpp, cuda: fastrlhf::gather_logprobs, a TORCH_LIBRARY op (csrc/gather_logprobs_op.cpp) whose checks,
        flattening to [N, V] and autograd formula are C++, with CPU, CUDA and Meta kernels
    triton: fastrlhf::gather_logprobs_fwd, a torch.library custom op defined here (fake impl, autograd
        through fastrlhf::gather_logprobs_bwd(_inplace)) over ops/triton/gather_logprobs.py
The "torch" backend is ``reference.gather_logprobs`` with plain autograd. ``forward_kernel`` and
``backward_kernel`` also serve ``linear_logprobs``, which runs them per chunk of logits.
"""

from __future__ import annotations

import torch

from fastrlhf._extension import extension
from fastrlhf.ops import reference
from fastrlhf.ops._backend import COMPILED_OP_BACKENDS, pick_backend, runs_compiled_op
from fastrlhf.ops._compiled import CompiledOp
from fastrlhf.ops._dispatch import kernel_op
from fastrlhf.ops._validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_labels_in_range,
    check_positive_finite,
    check_same_device,
    check_tensor,
)

_GATHER_LOGPROBS = CompiledOp("gather_logprobs")


def gather_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    backend: str = "auto",
):
    """Log-probability of each label under ``softmax(logits / temperature)``, without a full log-softmax.

    Args:
        logits: ``[..., V]`` float32 / bfloat16 / float16 (float64 runs on the torch backend).
        labels: ``[...]`` integer, the same leading shape; ``ignore_index`` marks positions to skip.
        temperature: > 0; the distribution is ``softmax(logits / temperature)``.
        ignore_index: label value whose position gives 0 and gets zero gradient.
        return_entropy: also return the entropy of the tempered distribution at each position.
        inplace_backward: write d(logits) into the logits buffer during backward instead of allocating
            a new ``[..., V]`` tensor. Only safe when nothing else needs ``logits`` after this op.
        backend: "auto", "torch", "cpp", "cuda" or "triton" (see ``available_backends()``).
    Returns:
        ``logprobs[...]`` float32 (float64 for float64 input), and ``entropy[...]`` if asked for.
    """
    if runs_compiled_op(backend, logits, labels):
        try:
            return _compiled(logits, labels, temperature, ignore_index, return_entropy, inplace_backward)
        except TypeError:  # an argument of a type the schema does not take: the checks below name it
            pass
    check_tensor("logits", logits, FLOAT_DTYPES)
    check_tensor("labels", labels, INDEX_DTYPES)
    device = check_same_device(logits=logits, labels=labels)
    if logits.dim() == 0:
        raise ValueError("logits must have at least 1 dimension (the vocabulary), got a scalar")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels has shape {tuple(labels.shape)}, but logits {tuple(logits.shape)} needs labels of shape "
            f"{tuple(logits.shape[:-1])}"
        )
    vocab = logits.shape[-1]
    if vocab == 0:
        raise ValueError("logits has an empty vocabulary dimension (size 0)")
    temperature = check_positive_finite("temperature", temperature)
    ignore_index = int(ignore_index)

    chosen = pick_backend(backend, device, dict(logits=logits))
    if chosen in COMPILED_OP_BACKENDS.values():
        return _compiled(logits, labels, temperature, ignore_index, return_entropy, inplace_backward)
    if chosen == "torch":
        check_labels_in_range(labels, vocab, ignore_index)
        return reference.gather_logprobs(logits, labels, temperature, ignore_index, return_entropy)

    lead_shape = labels.shape
    logits_2d = logits.reshape(-1, vocab)
    if logits_2d.stride(-1) != 1:
        logits_2d = logits_2d.contiguous()
    labels_1d = labels.reshape(-1).to(torch.int64).contiguous()
    logprobs, _stats, entropy = _forward_op(
        logits_2d, labels_1d, 1.0 / temperature, ignore_index, return_entropy, inplace_backward, chosen
    )
    if return_entropy:
        return logprobs.view(lead_shape), entropy.view(lead_shape)
    return logprobs.view(lead_shape)


def _compiled(logits, labels, temperature, ignore_index, return_entropy, inplace_backward):
    """The cpp / cuda backends: the C++ op, which checks its own arguments."""
    logprobs, entropy, _stats = _GATHER_LOGPROBS(
        logits, labels, temperature, ignore_index, bool(return_entropy), bool(inplace_backward)
    )
    return (logprobs, entropy) if return_entropy else logprobs


# ----------------------------------------------------------------------------------------------------
# the Triton backend's custom op
# ----------------------------------------------------------------------------------------------------


def _triton_kernels():
    from fastrlhf.ops.triton import gather_logprobs as kernels

    return kernels


def forward_kernel(backend, logits, labels, inv_temperature, ignore_index, with_entropy):
    """Run the forward kernel of ``backend`` ("cpp", "cuda" or "triton") on ``logits [N, V]``.

    Returns (logprobs ``[N]``, stats ``[N, 2]``, entropy ``[N]`` or ``[0]``), float32. Also used by
    ``linear_logprobs`` on each chunk of logits; labels are not range-checked here.
    """
    if backend == "triton":
        logprobs, stats, entropy = _triton_kernels().gather_logprobs_forward(
            logits, labels, inv_temperature, ignore_index, with_entropy
        )
        if entropy is None:
            entropy = logprobs.new_empty(0)
        return logprobs, stats, entropy
    return tuple(
        extension().gather_logprobs_forward(logits, labels, inv_temperature, ignore_index, with_entropy)
    )


@kernel_op("fastrlhf::gather_logprobs_fwd")
def _forward_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
    with_entropy: bool,
    inplace_backward: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits ``[N, V]`` (last-dim stride 1), labels ``[N]`` int64 → (logprobs ``[N]``, stats ``[N, 2]``,
    entropy ``[N]`` or ``[0]``), all float32. ``stats`` holds each row's (max of z, log Σ e^{z - max}),
    what the backward needs: kept apart, not summed into one lse, so that log p = (z - max) - log Σ
    stays exact for logits near ±1e4. ``inplace_backward`` only matters to the backward."""
    # Checked here rather than in the Python wrapper: a custom op body runs eagerly even inside a
    # torch.compile'd graph, so the data-dependent check costs no graph break. The C++ CPU kernel makes
    # the same check itself, in its loop over the labels.
    if backend != "cpp":
        check_labels_in_range(labels, logits.shape[-1], ignore_index)
    return forward_kernel(backend, logits, labels, inv_temperature, ignore_index, with_entropy)


@_forward_op.register_fake
def _(logits, labels, inv_temperature, ignore_index, with_entropy, inplace_backward, backend):
    rows = labels.shape[0]
    out = logits.new_empty(rows, dtype=torch.float32)
    entropy = logits.new_empty(rows if with_entropy else 0, dtype=torch.float32)
    return out, logits.new_empty((rows, 2), dtype=torch.float32), entropy


def backward_kernel(
    grad_logprobs, grad_entropy, logits, labels, stats, entropy, inv_temperature, ignore_index, backend, out
):
    """Write d(Σ g·logp + Σ h·entropy)/d(logits) into ``out`` (which may be ``logits`` itself).

    ``grad_entropy`` and ``entropy`` are ``[0]`` when the entropy is not part of the loss.
    """
    if backend == "triton":
        _triton_kernels().gather_logprobs_backward(
            grad_logprobs,
            grad_entropy if grad_entropy.numel() else None,
            logits,
            labels,
            stats,
            entropy if entropy.numel() else None,
            inv_temperature,
            ignore_index,
            out,
        )
    else:
        extension().gather_logprobs_backward(
            grad_logprobs, grad_entropy, logits, labels, stats, entropy, inv_temperature, ignore_index, out
        )


@kernel_op("fastrlhf::gather_logprobs_bwd")
def _backward_op(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    entropy: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
    backend: str,
) -> torch.Tensor:
    """d(logits) ``[N, V]`` in the logits dtype. ``grad_entropy``/``entropy`` are ``[0]`` when unused."""
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    backward_kernel(
        grad_logprobs,
        grad_entropy,
        logits,
        labels,
        stats,
        entropy,
        inv_temperature,
        ignore_index,
        backend,
        out,
    )
    return out


@_backward_op.register_fake
def _(grad_logprobs, grad_entropy, logits, labels, stats, entropy, inv_temperature, ignore_index, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@kernel_op("fastrlhf::gather_logprobs_bwd_inplace", mutates_args=("logits",))
def _backward_inplace_op(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    entropy: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
    backend: str,
) -> None:
    """Like ``gather_logprobs_bwd`` but overwrites ``logits`` with d(logits): no second ``[N, V]`` buffer."""
    backward_kernel(
        grad_logprobs,
        grad_entropy,
        logits,
        labels,
        stats,
        entropy,
        inv_temperature,
        ignore_index,
        backend,
        logits,
    )


def _setup_context(ctx, inputs, output):
    logits, labels, inv_temperature, ignore_index, with_entropy, inplace_backward, backend = inputs
    _logprobs, stats, entropy = output
    ctx.save_for_backward(logits, labels, stats, entropy)
    ctx.options = (inv_temperature, ignore_index, with_entropy, inplace_backward, backend)
    ctx.mark_non_differentiable(stats)


def _backward(ctx, grad_logprobs, _grad_stats, grad_entropy):
    logits, labels, stats, entropy = ctx.saved_tensors
    inv_temperature, ignore_index, with_entropy, inplace_backward, backend = ctx.options
    rows = labels.shape[0]
    if grad_logprobs is None:
        grad_logprobs = stats.new_zeros(rows)
    grad_logprobs = grad_logprobs.to(torch.float32).contiguous()
    if with_entropy and grad_entropy is not None:
        grad_entropy = grad_entropy.to(torch.float32).contiguous()
    else:
        grad_entropy = stats.new_empty(0)
    args = (
        grad_logprobs,
        grad_entropy,
        logits,
        labels,
        stats,
        entropy,
        inv_temperature,
        ignore_index,
        backend,
    )
    if inplace_backward:
        _backward_inplace_op(*args)
        grad_logits = logits
    else:
        grad_logits = _backward_op(*args)
    return grad_logits, None, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)
