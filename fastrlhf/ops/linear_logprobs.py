"""linear_logprobs: log-probabilities straight from the last hidden state and the lm_head.

Equal to ``gather_logprobs(hidden @ weight.T + bias, labels)``, but the ``[N, V]`` logits never exist
in full: ``_linear_chunks`` runs the forward one block of logits at a time, with float32 products (on
CPU, when a backward follows, a block of vocabulary columns for every row; otherwise a block of rows), and
the backward recomputes the logits one block of vocabulary columns at a time (one extra GEMM) instead of
keeping them. Four GEMMs in all against eager's three; the fused PPO loss needs only three.

Layers, from the user down:
    linear_logprobs()        backend choice and the chunk size; for torch / triton also validation
    cpp, cuda: fastrlhf::linear_logprobs, a TORCH_LIBRARY op (csrc/linear_logprobs_op.cpp): checks, the
        chunk loop over the GEMMs and the gather kernels, and the autograd formula in C++
    triton: fastrlhf::linear_logprobs_fwd / _bwd, torch.library custom ops defined here, over the Python
        chunk engine (``_linear_chunks``) and the Triton gather kernels
The two chunk engines make the same GEMMs on the same blocks, so cpp and the engine give the same bits.
The "torch" backend is ``reference.linear_logprobs``: the eager composition, full logits and all.
"""

from __future__ import annotations

import torch

from fastrlhf.ops import reference
from fastrlhf.ops._backend import COMPILED_OP_BACKENDS, pick_backend, runs_compiled_op
from fastrlhf.ops._compiled import CompiledOp
from fastrlhf.ops._dispatch import kernel_op
from fastrlhf.ops._linear_chunks import (
    LinearHead,
    backward_by_columns,
    backward_follows,
    default_chunk_rows,
    forward_chunks,
)
from fastrlhf.ops._validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_labels_in_range,
    check_positive_finite,
    check_same_device,
    check_tensor,
)

_LINEAR_LOGPROBS = CompiledOp("linear_logprobs")


def check_linear_inputs(hidden, weight, labels, bias) -> torch.device:
    """hidden ``[..., H]``, weight ``[V, H]`` of the same dtype, labels ``[...]``, bias ``[V]`` or None."""
    check_tensor("hidden", hidden, FLOAT_DTYPES)
    check_tensor("weight", weight, FLOAT_DTYPES)
    check_tensor("labels", labels, INDEX_DTYPES)
    if bias is not None:
        check_tensor("bias", bias, FLOAT_DTYPES)
    device = check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least 1 dimension (the hidden size), got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [vocab, hidden], got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)} but hidden's last dimension is {hidden.shape[-1]}: "
            "weight must be [vocab, hidden] (an nn.Linear / lm_head weight)"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary dimension (size 0)")
    if weight.dtype != hidden.dtype:
        raise ValueError(
            f"hidden is {hidden.dtype} but weight is {weight.dtype}; give both in one dtype "
            "(the products accumulate in float32 either way)"
        )
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels has shape {tuple(labels.shape)}, but hidden {tuple(hidden.shape)} needs labels of shape "
            f"{tuple(hidden.shape[:-1])}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"bias must have shape ({weight.shape[0]},) like weight's rows, got {tuple(bias.shape)}"
        )
    return device


def check_chunk_size(chunk_size, rows: int, hidden_size: int, vocab: int, device: torch.device) -> int:
    if chunk_size is None:
        return default_chunk_rows(rows, hidden_size, vocab, device.type)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be None or a positive int (rows per chunk), got {chunk_size!r}")
    return chunk_size


def kernel_backend(backend: str, hidden: torch.Tensor, device: torch.device) -> str:
    """The backend to run on (``pick_backend``'s rule, applied to the hidden states)."""
    return pick_backend(backend, device, dict(hidden=hidden))


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
):
    """Log-probability of each label under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Never holds more than ``chunk_size`` rows of the logits; gradients flow to hidden, weight and bias.

    Args:
        hidden: ``[..., H]`` float32 / bfloat16 / float16 (float64 runs on the torch backend).
        weight: ``[V, H]`` the lm_head weight, same dtype as ``hidden``. bias: ``[V]`` or None.
        labels: ``[...]`` integer, ``hidden``'s leading shape; ``ignore_index`` gives 0 and no gradient.
        temperature: > 0. return_entropy: also return the entropy of the tempered distribution.
        chunk_size: rows of logits per block; None picks one from N, H and V (see
            ``_linear_chunks.default_chunk_rows``).
        backend: "auto", "torch", "cpp", "cuda" or "triton".
    Returns:
        ``logprobs[...]`` float32 (float64 for float64 input), and ``entropy[...]`` if asked for.
    """
    # A bool is an int to the typed call; the Python path refuses it as a chunk size.
    plain_chunk = chunk_size is None or type(chunk_size) is int
    if plain_chunk and runs_compiled_op(backend, hidden, weight, labels, bias):
        try:
            return _compiled(
                hidden, weight, labels, bias, temperature, ignore_index, return_entropy, chunk_size
            )
        except TypeError:  # an argument of a type the schema does not take: the checks below name it
            pass
    device = check_linear_inputs(hidden, weight, labels, bias)
    temperature = check_positive_finite("temperature", temperature)
    ignore_index = int(ignore_index)
    hidden_size, vocab = hidden.shape[-1], weight.shape[0]
    rows = labels.numel()
    chunk_rows = check_chunk_size(chunk_size, rows, hidden_size, vocab, device)
    chosen = kernel_backend(backend, hidden, device)
    if chosen in COMPILED_OP_BACKENDS.values():
        return _compiled(hidden, weight, labels, bias, temperature, ignore_index, return_entropy, chunk_rows)
    if chosen == "torch":
        check_labels_in_range(labels, vocab, ignore_index)
        return reference.linear_logprobs(
            hidden, weight, labels, bias, temperature, ignore_index, return_entropy
        )

    lead_shape = labels.shape
    hidden2d = hidden.reshape(rows, hidden_size)
    labels_1d = labels.reshape(-1).to(torch.int64).contiguous()
    logprobs, _stats, entropy = _forward_op(
        hidden2d,
        weight,
        bias,
        labels_1d,
        1.0 / temperature,
        ignore_index,
        return_entropy,
        chunk_rows,
        backward_follows(hidden, weight, bias),
        chosen,
    )
    if return_entropy:
        return logprobs.view(lead_shape), entropy.view(lead_shape)
    return logprobs.view(lead_shape)


def compiled_chunk_rows(hidden, weight, labels, chunk_size: int | None) -> int:
    """The chunk size a compiled linear op is given: ``chunk_size``, or the default for these shapes when
    None. Reads shapes only, before any check: the C++ op checks its own arguments, a bad shape included."""
    if chunk_size is not None:
        return chunk_size
    return default_chunk_rows(
        labels.numel(),
        hidden.shape[-1] if hidden.dim() else 0,
        weight.shape[0] if weight.dim() else 0,
        "cpu" if hidden.is_cpu else hidden.device.type,
    )


def _compiled(hidden, weight, labels, bias, temperature, ignore_index, return_entropy, chunk_size):
    """The cpp / cuda backends: the C++ op, which checks its own arguments."""
    logprobs, entropy, _stats = _LINEAR_LOGPROBS(
        hidden,
        weight,
        labels,
        bias,
        temperature,
        ignore_index,
        bool(return_entropy),
        compiled_chunk_rows(hidden, weight, labels, chunk_size),
        backward_follows(hidden, weight, bias),
    )
    return (logprobs, entropy) if return_entropy else logprobs


# ----------------------------------------------------------------------------------------------------
# the Triton backend's custom ops
# ----------------------------------------------------------------------------------------------------


@kernel_op("fastrlhf::linear_logprobs_fwd")
def _forward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
    with_entropy: bool,
    chunk_rows: int,
    by_columns: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden ``[N, H]``, weight ``[V, H]``, bias ``[V]`` or None, labels ``[N]`` int64 →
    (logprobs ``[N]``, stats ``[N, 2]``, entropy ``[N]`` or ``[0]``), float32. ``by_columns``: the
    forward's blocks (``_linear_chunks.forward_by_columns``)."""
    check_labels_in_range(labels, weight.shape[0], ignore_index)
    head = LinearHead(weight, bias)
    return forward_chunks(
        head, hidden, labels, inv_temperature, ignore_index, with_entropy, chunk_rows, backend, by_columns
    )


@_forward_op.register_fake
def _(
    hidden, weight, bias, labels, inv_temperature, ignore_index, with_entropy, chunk_rows, by_columns, backend
):
    rows = labels.shape[0]
    out = hidden.new_empty(rows, dtype=torch.float32)
    entropy = hidden.new_empty(rows if with_entropy else 0, dtype=torch.float32)
    return out, hidden.new_empty((rows, 2), dtype=torch.float32), entropy


@kernel_op("fastrlhf::linear_logprobs_bwd")
def _backward_op(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    stats: torch.Tensor,
    entropy: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
    chunk_rows: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_hidden ``[N, H]``, d_weight ``[V, H]``, d_bias ``[V]``) in the inputs' dtypes; a gradient that
    is not needed comes back as an empty ``[0]`` tensor. ``grad_entropy``/``entropy`` are ``[0]`` when
    the entropy is not part of the loss."""
    head = LinearHead(weight, bias)
    d_hidden, d_weight, d_bias = backward_by_columns(
        head,
        hidden,
        labels,
        stats,
        entropy,
        grad_logprobs,
        grad_entropy,
        inv_temperature,
        ignore_index,
        backend,
        chunk_rows,
        need_hidden,
        need_weight,
        need_bias and bias is not None,
    )
    # A gradient not asked for comes back as its own empty tensor (custom-op outputs may not alias).
    return tuple(hidden.new_empty(0) if g is None else g for g in (d_hidden, d_weight, d_bias))


@_backward_op.register_fake
def _(
    grad_logprobs,
    grad_entropy,
    hidden,
    weight,
    bias,
    labels,
    stats,
    entropy,
    inv_temperature,
    ignore_index,
    chunk_rows,
    need_hidden,
    need_weight,
    need_bias,
    backend,
):
    d_hidden = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    d_weight = torch.empty_like(weight) if need_weight else hidden.new_empty(0)
    d_bias = torch.empty_like(bias) if need_bias and bias is not None else hidden.new_empty(0)
    return d_hidden, d_weight, d_bias


def _setup_context(ctx, inputs, output):
    (
        hidden,
        weight,
        bias,
        labels,
        inv_temperature,
        ignore_index,
        with_entropy,
        chunk_rows,
        _by_columns,
        backend,
    ) = inputs
    _logprobs, stats, entropy = output
    ctx.save_for_backward(hidden, weight, bias, labels, stats, entropy)
    ctx.options = (inv_temperature, ignore_index, with_entropy, chunk_rows, backend)
    ctx.mark_non_differentiable(stats)


def _backward(ctx, grad_logprobs, _grad_stats, grad_entropy):
    hidden, weight, bias, labels, stats, entropy = ctx.saved_tensors
    inv_temperature, ignore_index, with_entropy, chunk_rows, backend = ctx.options
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    if grad_logprobs is None:
        grad_logprobs = stats.new_zeros(labels.shape[0])
    grad_logprobs = grad_logprobs.to(torch.float32).contiguous()
    if with_entropy and grad_entropy is not None:
        grad_entropy = grad_entropy.to(torch.float32).contiguous()
    else:
        grad_entropy = stats.new_empty(0)
        entropy = stats.new_empty(0)
    d_hidden, d_weight, d_bias = _backward_op(
        grad_logprobs,
        grad_entropy,
        hidden,
        weight,
        bias,
        labels,
        stats,
        entropy,
        inv_temperature,
        ignore_index,
        chunk_rows,
        need_hidden,
        need_weight,
        need_bias and bias is not None,
        backend,
    )
    return (
        d_hidden if need_hidden else None,
        d_weight if need_weight else None,
        d_bias if need_bias and bias is not None else None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


_forward_op.register_autograd(_backward, setup_context=_setup_context)
