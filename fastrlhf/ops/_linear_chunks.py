"""The chunked hidden × lm_head engine under ``linear_logprobs`` and the fused PPO loss.

No more than ``chunk_rows × V`` logits exist at a time, always in float32 (see _matmul).

By vocabulary columns (``linear_logprobs``' forward on CPU when a backward follows; see
``forward_by_columns``): per block of columns, a ``[N, cols]`` block of logits from one GEMM of every row
against that block of the head, folded into each row's running softmax state (max, Σ, entropy sum) by the
C++ CPU kernel; the label's raw logit is kept by the block that holds it, and a last pass turns the states
into log-probs, stats and entropy.

By rows (the forward elsewhere, and the fused loss, which makes its gradient in the forward): per block
of rows

    logits = hidden[rows] @ weight.T + bias            one GEMM
    gather kernel forward (and backward, in place)     C++ / CUDA / Triton
    d_hidden[rows] = d_logits @ weight                 one GEMM
    d_weight += d_logits.T @ hidden[rows]              one GEMM into a float32 [V, H] accumulator

By vocabulary columns (``linear_logprobs``' backward, which must recompute the logits): the forward saved
each row's softmax stats (max, log Σ), so a ``[N, cols]`` block of logits is enough to form its
d(logits), and then

    d_weight[cols] = d_logits.T @ hidden               written once: no [V, H] accumulator to re-read
    d_hidden += d_logits @ weight[cols]                a float32 [N, H] accumulator, far smaller
"""

from __future__ import annotations

import functools
import math

import torch

from fastrlhf._extension import extension
from fastrlhf.ops._matmul import Fp32Operand, addmm_fp32_, mm_fp32
from fastrlhf.ops.gather_logprobs import backward_kernel, forward_kernel

# GEMMs with fewer rows than this stop using the hardware well (tensor-core tiles are 64-256 rows on
# GPU; a CPU GEMM needs ~128 rows to amortise packing the weight: [rows, 256] x [256, 32000] fp32 on a
# 2-core AMD EPYC ran the forward at 58 GFLOP/s with 64 rows, 83 with 128 and 85 with 256, and the
# backward's two GEMMs at 89, 133 and 135; a 128-row chunk of fp32 logits is 16 MiB at that vocabulary).
MIN_CHUNK_ROWS = {"cuda": 256, "cpu": 128}


@functools.lru_cache(maxsize=1024)  # on every call of the ops; a few shapes recur through a run
def default_chunk_rows(rows: int, hidden_size: int, vocab_size: int, device_type: str) -> int:
    """Rows per chunk: enough that the fp32 ``[chunk, V]`` logits take about as much memory as the
    ``[N, H]`` hidden states they stand in for (so chunking never costs more than the input itself),
    rounded up to a power of two and to the device's GEMM-efficiency floor, never more than ``rows``."""
    if rows <= 0:
        return 1
    balanced = math.ceil(rows * hidden_size / max(vocab_size, 1))
    chunk = max(1 << max(balanced - 1, 0).bit_length(), MIN_CHUNK_ROWS.get(device_type, 64))
    return min(chunk, rows)


class LinearHead:
    """``weight [V, H]`` and ``bias [V]`` prepared once per call for float32 products."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight = Fp32Operand(weight)
        self.bias = None if bias is None else bias.to(torch.float32)
        self.weight_dtype = weight.dtype
        self.bias_dtype = None if bias is None else bias.dtype

    def logits(self, hidden_rows: torch.Tensor, columns: slice = slice(None)) -> torch.Tensor:
        """``hidden_rows [C, H]`` → float32 ``[C, V]`` logits, or only the vocabulary ``columns``
        (a fresh buffer the kernels may overwrite)."""
        w = self.weight
        logits = mm_fp32(w.cast(hidden_rows), w.tensor[columns].t(), w.native)
        if self.bias is not None:
            logits.add_(self.bias[columns])
        return logits


class LinearGrads:
    """Gradient buffers of one call: ``hidden [N, H]`` (input dtype), ``weight [V, H]`` and ``bias [V]``
    accumulated in float32 across chunks. A buffer is None when that input needs no gradient."""

    def __init__(self, hidden2d, weight, bias, need_hidden: bool, need_weight: bool, need_bias: bool):
        self.hidden = torch.empty_like(hidden2d) if need_hidden else None
        self.weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        )
        self.bias = (
            torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
            if need_bias and bias is not None
            else None
        )

    def add_chunk(
        self, head: LinearHead, hidden_rows: torch.Tensor, d_logits: torch.Tensor, start: int
    ) -> None:
        """Fold one chunk's ``d_logits [C, V]`` (float32) into the buffers; ``hidden_rows`` is rows
        ``start:start+C`` of the hidden states."""
        w = head.weight
        d_low = w.cast(d_logits)  # fp32 stays fp32; with a native bf16 GEMM the operand is rounded once
        if self.hidden is not None:
            self.hidden[start : start + d_logits.shape[0]] = mm_fp32(d_low, w.tensor, w.native)
        if self.weight is not None:
            addmm_fp32_(self.weight, d_low.t(), w.cast(hidden_rows), w.native)
        if self.bias is not None:
            self.bias.add_(d_logits.sum(0))

    def results(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """(d_hidden, d_weight, d_bias) in the inputs' dtypes; None where not asked for."""
        d_weight = None if self.weight is None else self.weight.to(weight.dtype)
        d_bias = None if self.bias is None else self.bias.to(bias.dtype)
        return self.hidden, d_weight, d_bias


def chunk_bounds(rows: int, chunk_rows: int):
    """``(start, end)`` of each chunk of ``rows``."""
    for start in range(0, rows, chunk_rows):
        yield start, min(start + chunk_rows, rows)


def backward_follows(*tensors) -> bool:
    """Whether autograd will record a call on ``tensors`` (None allowed): grad mode is on and one of them
    requires grad. ``linear_logprobs`` then asks for the forward by columns (``forward_by_columns``)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def forward_by_columns(
    by_columns: bool, backend: str, device: torch.device, rows: int, chunk_rows: int
) -> bool:
    """Whether the forward goes by blocks of vocabulary columns: when the caller asks (``by_columns``), with
    the C++ CPU kernels, which fold a block into running softmax states, when the rows take more than one
    chunk. The CUDA and Triton gather kernels have no fold, so they go by rows.

    A GEMM of every row against a block of the head packs that block once, where each 128-row chunk
    repacks the whole head (N=4096, H=512, V=32000 fp32, Intel Xeon: 0.44 s of forward GEMMs by columns,
    0.57 s by rows), and the blocks are the ones the backward recomputes, to the bit. ``linear_logprobs``
    asks for it only when a backward follows: without one, the rows blocks give the bits of the fused PPO
    loss's forward, which also goes by rows, so PPO's old log-probs (taken under no_grad) make its first
    ratio exactly 1."""
    return by_columns and backend == "cpp" and device.type == "cpu" and rows > chunk_rows


def forward_chunks(
    head, hidden2d, labels, inv_temperature, ignore_index, with_entropy, chunk_rows, backend, by_columns=False
):
    """Log-probs of ``labels [N]`` under ``hidden2d [N, H]`` × head, one chunk of logits at a time: by
    columns where ``forward_by_columns`` says so, else by rows.

    Returns (logprobs ``[N]``, stats ``[N, 2]``, entropy ``[N]`` or ``[0]``), float32.
    """
    rows = hidden2d.shape[0]
    if forward_by_columns(by_columns, backend, hidden2d.device, rows, chunk_rows):
        return forward_by_column_blocks(
            head, hidden2d, labels, inv_temperature, ignore_index, with_entropy, chunk_rows
        )
    device = hidden2d.device
    logprobs = torch.empty(rows, dtype=torch.float32, device=device)
    stats = torch.empty(rows, 2, dtype=torch.float32, device=device)
    entropy = torch.empty(rows if with_entropy else 0, dtype=torch.float32, device=device)
    for start, end in chunk_bounds(rows, chunk_rows):
        logits = head.logits(hidden2d[start:end])
        lp, st, ent = forward_kernel(
            backend, logits, labels[start:end], inv_temperature, ignore_index, with_entropy
        )
        logprobs[start:end] = lp
        stats[start:end] = st
        if with_entropy:
            entropy[start:end] = ent
        del logits  # free this chunk's block before the next GEMM allocates one
    return logprobs, stats, entropy


def forward_by_column_blocks(head, hidden2d, labels, inv_temperature, ignore_index, with_entropy, chunk_rows):
    """``forward_chunks`` one ``[N, cols]`` block of logits at a time (C++ CPU kernels)."""
    rows, vocab = hidden2d.shape[0], head.weight.tensor.shape[0]
    ext = extension()
    ignored = labels == ignore_index
    state = ext.empty_softmax_states(rows)
    label_logit = torch.zeros(rows, dtype=torch.float32)
    width = column_block_width(rows, vocab, chunk_rows)
    for start in range(0, vocab, width):
        end = min(start + width, vocab)
        logits = head.logits(hidden2d, slice(start, end))
        block_labels = labels_in_block(labels, ignored, start, end)
        ext.gather_logprobs_fold(
            logits, block_labels, inv_temperature, BLOCK_IGNORE, with_entropy, state, label_logit
        )
        del logits  # free this block before the next GEMM allocates one
    return ext.gather_logprobs_finalize(
        state, label_logit, labels, inv_temperature, ignore_index, with_entropy
    )


def backward_chunk(
    head,
    grads,
    hidden_rows,
    labels,
    stats,
    entropy,
    grad_logprobs,
    grad_entropy,
    inv_temperature,
    ignore_index,
    backend,
    start,
    logits,
):
    """Gradients of ``Σ g·logp + Σ h·entropy`` for one chunk of rows, folded into ``grads``. ``logits`` is
    the chunk's float32 logits from the forward (the fused loss makes its gradient there); it is
    overwritten with d(logits)."""
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
    grads.add_chunk(head, hidden_rows, logits, start)


# The gather kernels' ignore_index inside a column block: rows the caller ignores are mapped here, and rows
# whose label lies in another block get NOT_IN_BLOCK, which no column index equals (no one-hot term).
BLOCK_IGNORE = -1
NOT_IN_BLOCK = -2


def column_block_width(rows: int, vocab: int, chunk_rows: int) -> int:
    """Vocabulary columns per block: the ``chunk_rows × V`` logits budget, spent on all rows."""
    return max(1, min(vocab, (chunk_rows * vocab) // max(rows, 1)))


def labels_in_block(labels, ignored, start: int, end: int):
    """``labels [N]`` as the gather kernels see them inside the columns ``[start, end)``: the label's column
    in the block, BLOCK_IGNORE where ``ignored [N]`` (bool), NOT_IN_BLOCK where the label lies elsewhere."""
    in_block = (labels >= start) & (labels < end)
    return torch.where(
        ignored,
        torch.full_like(labels, BLOCK_IGNORE),
        torch.where(in_block, labels - start, torch.full_like(labels, NOT_IN_BLOCK)),
    )


def backward_by_columns(
    head,
    hidden2d,
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
    need_bias,
):
    """Gradients of ``Σ g·logp + Σ h·entropy`` w.r.t. hidden ``[N, H]``, weight ``[V, H]`` and bias ``[V]``,
    one ``[N, cols]`` block of recomputed logits at a time. ``grad_entropy``/``entropy`` are ``[0]`` when
    the entropy is not part of the loss. Returns (d_hidden, d_weight, d_bias), None where not needed,
    in the inputs' dtypes."""
    rows, vocab = hidden2d.shape[0], head.weight.tensor.shape[0]
    device = hidden2d.device
    w = head.weight
    hidden_gemm = w.cast(hidden2d)
    d_hidden = torch.zeros(hidden2d.shape, dtype=torch.float32, device=device) if need_hidden else None
    d_weight = (
        torch.empty(head.weight.tensor.shape, dtype=head.weight_dtype, device=device) if need_weight else None
    )
    d_bias = torch.empty(vocab, dtype=head.bias_dtype, device=device) if need_bias else None
    ignored = labels == ignore_index
    width = column_block_width(rows, vocab, chunk_rows)
    for start in range(0, vocab, width):
        end = min(start + width, vocab)
        columns = slice(start, end)
        block_labels = labels_in_block(labels, ignored, start, end)
        logits = head.logits(hidden2d, columns)
        backward_kernel(
            grad_logprobs,
            grad_entropy,
            logits,
            block_labels,
            stats,
            entropy,
            inv_temperature,
            BLOCK_IGNORE,
            backend,
            logits,
        )
        d_low = w.cast(logits)
        if d_weight is not None:
            d_weight[columns] = mm_fp32(d_low.t(), hidden_gemm, w.native)
        if d_hidden is not None:
            addmm_fp32_(d_hidden, d_low, w.tensor[columns], w.native)
        if d_bias is not None:
            d_bias[columns] = logits.sum(0)
        del logits, d_low
    return (None if d_hidden is None else d_hidden.to(hidden2d.dtype)), d_weight, d_bias
