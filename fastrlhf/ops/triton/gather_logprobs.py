"""Fused log-softmax + gather (+ optional entropy) over the vocabulary, in Triton.

For each row ``i`` of ``logits[N, V]`` with ``z = logits * inv_temperature``:

    m_i       = max_j z_ij,   log_s_i = log sum_j e^{z_ij - m_i}
    logprob_i = (z_i[label_i] - m_i) - log_s_i
    entropy_i = -sum_j p_ij log p_ij,   p = softmax(z)

The forward saves ``stats[i] = (m_i, log_s_i)`` for the backward, which takes
``log p_ij = (z_ij - m_i) - log_s_i``. Not ``lse = m + log_s``: for logits near 1e4 an fp32 lse carries ~1e-3
of rounding that ``z - lse`` would pass to every log p, while ``z - m`` and ``log_s`` stay small.

Rows whose label equals ``ignore_index`` are not read: their logprob, entropy and stats are 0, and their
gradient is 0. Everything is accumulated in fp32 whatever the logits dtype. -inf logits are allowed (a
label on one gives logprob -inf); a row that is -inf everywhere has no distribution and gives NaN, as
``torch.log_softmax`` does.

Forward: a single streaming pass over each row with an online logsumexp. For a running max ``m`` it keeps

    s = sum_j e^{z_j - m}            a = sum_j e^{z_j - m} (z_j - m)

and rescales both when the max grows from ``m`` to ``m'``: ``s' = s e^{m-m'}``,
``a' = e^{m-m'} (a + (m - m') s)``. At the end ``log_s = log s`` and ``entropy = log s - a / s``.
When there are few rows and a long vocabulary the row is split over several programs that each reduce a
slice to partial ``(m, s, a)``, merged by a second small kernel.

Backward (elementwise over (row, vocab block), may run in place on the logits buffer):

    dlogits_ij = inv_T * ( g_i (1[j == label_i] - p_ij) - h_i p_ij (log p_ij + H_i) )

with ``p_ij = exp((z_ij - m_i) - log_s_i)`` and the entropy term taken as 0 where ``p_ij == 0``.

Every kernel gets ``z_ij - m`` from ``_shifted_logit``, one fused multiply-add, so the forward's sums, the
label's logprob and the backward agree on it exactly (see there).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._utils import MIN_BLOCK_V, check_block_v, device_context, row_block_v, row_num_warps

__all__ = ["gather_logprobs_backward", "gather_logprobs_forward"]

# Below this many columns per split program, writing partials + the combine launch cost more than the
# extra parallelism buys (8192 bf16 columns = 16 KiB, a few microseconds of one program's bandwidth).
_MIN_COLS_PER_SPLIT = 8192
# The combine kernel holds all partials of a row in one block; 1024 is far more than any useful split.
_MAX_SPLITS = 1024
# SM count assumed when there is no CUDA device (interpreter runs): an H100 SXM has 132 SMs.
_DEFAULT_SM_COUNT = 132


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _shifted_logit(x, inv_temperature, m):
    """``z - m`` for ``z = x * inv_temperature``, as one fused multiply-add; ``m`` is a max of rounded ``z``.

    Fused explicitly, not left to fp fusion (on by default in Triton 3.9, off from 3.10): the forward's sums,
    the label's logprob and the backward must all see the same value, or a dominant logit, whose ``z - m`` is
    its product's rounding error when fused and 0 when not (~5e-4 at ``|z| = 1e4``), gets a ``p`` that
    disagrees with the forward's sum by that much. Fused is also the more accurate choice: the product is
    exact, so at ``T != 1`` the result carries no rounding of the ``|z|``-sized product. -inf logits give -inf
    (NaN when ``m`` is -inf too: only in a row of only -inf logits, which gives NaN anyway).
    """
    return tl.fma(x, inv_temperature, -m)


@triton.jit
def _row_slice_stats(
    row_ptr,
    col_start,
    col_end,
    inv_temperature,
    BLOCK_V: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
):
    """Online (max, sum-exp, sum-exp-weighted-shift) of ``z = x * inv_temperature`` over x[col_start:col_end].

    Returns fp32 scalars ``(m, s, a)`` with ``s = sum e^{z-m}`` and ``a = sum e^{z-m} (z-m)`` (``a`` is 0
    when ``WITH_ENTROPY`` is false). A slice that is entirely -inf (or empty) returns ``(-inf, 0, 0)``.
    """
    m = float("-inf")
    s = 0.0
    a = 0.0
    offs = tl.arange(0, BLOCK_V)
    for start in range(col_start, col_end, BLOCK_V):
        cols = start + offs
        mask = cols < col_end
        # Masked lanes read -inf so they contribute e^{-inf} = 0 to every sum.
        x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        # The max of the rounded z: the m that the stats save and the backward shifts by.
        m_new = tl.maximum(m, tl.max(x * inv_temperature, axis=0))
        # While everything seen so far is -inf, shift by 0 instead of m_new: (-inf) - (-inf) would be NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        t = _shifted_logit(x, inv_temperature, shift)
        e = tl.exp(t)
        alpha = tl.exp(m - shift)  # rescale of the old sums; 0 while m is still -inf
        if WITH_ENTROPY:
            # e * t is 0 * (-inf) = NaN on -inf logits; those terms are exactly 0.
            ez = tl.where(e > 0.0, e * t, 0.0)
            # (m - shift) * s is (-inf) * 0 before the first finite value; the correction is 0 then.
            a = alpha * (a + tl.where(s > 0.0, (m - shift) * s, 0.0)) + tl.sum(ez, axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new
    return m, s, a


@triton.jit
def _gather_logprobs_fwd_kernel(
    logprobs_ptr,
    stats_ptr,
    entropy_ptr,
    logits_ptr,
    labels_ptr,
    stride_logits_row,
    V,
    inv_temperature,
    ignore_index,
    BLOCK_V: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
):
    """One program per row, the whole vocabulary in one pass.

    logprobs_ptr, entropy_ptr: f32[N] outputs (entropy only written when WITH_ENTROPY); stats_ptr: f32[N, 2]
    output, contiguous, (m, log_s) per row.
    logits_ptr: [N, V] (row stride ``stride_logits_row``, unit column stride); labels_ptr: int64[N].
    """
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        tl.store(logprobs_ptr + row, 0.0)
        tl.store(stats_ptr + 2 * row, 0.0)
        tl.store(stats_ptr + 2 * row + 1, 0.0)
        if WITH_ENTROPY:
            tl.store(entropy_ptr + row, 0.0)
        return

    # int64 row offset: N * stride exceeds 2^31 elements for e.g. 16k rows of a 152k vocabulary.
    row_ptr = logits_ptr + row * stride_logits_row
    # The label logit is one scalar load, issued before the stream so its latency overlaps it.
    x_label = tl.load(row_ptr + label).to(tl.float32)
    m, s, a = _row_slice_stats(row_ptr, 0, V, inv_temperature, BLOCK_V, WITH_ENTROPY)

    log_s = tl.log(s)
    tl.store(logprobs_ptr + row, _shifted_logit(x_label, inv_temperature, m) - log_s)
    tl.store(stats_ptr + 2 * row, m)
    tl.store(stats_ptr + 2 * row + 1, log_s)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, log_s - a / s)


@triton.jit
def _gather_logprobs_fwd_partial_kernel(
    partial_ptr,
    logits_ptr,
    labels_ptr,
    stride_logits_row,
    V,
    cols_per_split,
    num_splits,
    inv_temperature,
    ignore_index,
    BLOCK_V: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
):
    """Grid (N, num_splits): program (i, k) reduces columns [k*cols_per_split, (k+1)*cols_per_split) of row i.

    partial_ptr: f32[N, 3, num_splits] output holding (m, s, a) of each slice; ignored rows are not written
    (the combine kernel never reads them).
    """
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        return

    col_start = split * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, V)
    m, s, a = _row_slice_stats(
        logits_ptr + row * stride_logits_row, col_start, col_end, inv_temperature, BLOCK_V, WITH_ENTROPY
    )
    out = partial_ptr + row * 3 * num_splits + split
    tl.store(out, m)
    tl.store(out + num_splits, s)
    if WITH_ENTROPY:
        tl.store(out + 2 * num_splits, a)


@triton.jit
def _gather_logprobs_fwd_combine_kernel(
    logprobs_ptr,
    stats_ptr,
    entropy_ptr,
    partial_ptr,
    logits_ptr,
    labels_ptr,
    stride_logits_row,
    num_splits,
    inv_temperature,
    ignore_index,
    BLOCK_S: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
):
    """One program per row: merge the num_splits partial (m, s, a) of the row and gather the label logit.

    partial_ptr: f32[N, 3, num_splits] from the partial kernel; outputs as in the single-pass kernel.
    """
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        tl.store(logprobs_ptr + row, 0.0)
        tl.store(stats_ptr + 2 * row, 0.0)
        tl.store(stats_ptr + 2 * row + 1, 0.0)
        if WITH_ENTROPY:
            tl.store(entropy_ptr + row, 0.0)
        return

    x_label = tl.load(logits_ptr + row * stride_logits_row + label).to(tl.float32)

    ks = tl.arange(0, BLOCK_S)
    kmask = ks < num_splits
    base = partial_ptr + row * 3 * num_splits + ks
    m_k = tl.load(base, mask=kmask, other=float("-inf"))
    s_k = tl.load(base + num_splits, mask=kmask, other=0.0)
    m = tl.max(m_k, axis=0)
    shift = tl.where(m == float("-inf"), 0.0, m)  # all-(-inf) row: avoid (-inf) - (-inf)
    c_k = tl.exp(m_k - shift)  # 0 for all-(-inf) slices and padding lanes
    s = tl.sum(c_k * s_k, axis=0)

    log_s = tl.log(s)
    tl.store(logprobs_ptr + row, _shifted_logit(x_label, inv_temperature, m) - log_s)
    tl.store(stats_ptr + 2 * row, m)
    tl.store(stats_ptr + 2 * row + 1, log_s)
    if WITH_ENTROPY:
        a_k = tl.load(base + 2 * num_splits, mask=kmask, other=0.0)
        # Re-center each slice's a on the global max: a_k e^{m_k-m} + (m_k - m) s_k e^{m_k-m}; slices with
        # s_k == 0 have m_k == -inf and would give (-inf) * 0.
        a_terms = c_k * (a_k + tl.where(s_k > 0.0, (m_k - shift) * s_k, 0.0))
        a = tl.sum(a_terms, axis=0)
        tl.store(entropy_ptr + row, log_s - a / s)


@triton.jit
def _gather_logprobs_bwd_kernel(
    dlogits_ptr,
    grad_logprobs_ptr,
    grad_entropy_ptr,
    logits_ptr,
    labels_ptr,
    stats_ptr,
    entropy_ptr,
    stride_dlogits_row,
    stride_logits_row,
    V,
    inv_temperature,
    ignore_index,
    BLOCK_V: tl.constexpr,
    WITH_ENTROPY_GRAD: tl.constexpr,
):
    """Grid (N, cdiv(V, BLOCK_V)): gradient of one vocabulary block of one row.

    dlogits_ptr: [N, V] output in the logits dtype, may be the logits buffer itself (each element is read
    before it is written by the same thread). grad_logprobs_ptr: f32[N]; stats_ptr: f32[N, 2] contiguous, from
    the forward; grad_entropy_ptr, entropy_ptr: f32[N], only read when WITH_ENTROPY_GRAD; labels_ptr:
    int64[N].
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    out_ptr = dlogits_ptr + row * stride_dlogits_row + cols

    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        tl.store(out_ptr, tl.zeros((BLOCK_V,), tl.float32).to(dlogits_ptr.dtype.element_ty), mask=mask)
        return

    g = tl.load(grad_logprobs_ptr + row)
    m = tl.load(stats_ptr + 2 * row)
    log_s = tl.load(stats_ptr + 2 * row + 1)
    x = tl.load(logits_ptr + row * stride_logits_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
    logp = _shifted_logit(x, inv_temperature, m) - log_s
    p = tl.exp(logp)
    grad = tl.where(cols == label, g, 0.0) - g * p
    if WITH_ENTROPY_GRAD:
        h = tl.load(grad_entropy_ptr + row)
        ent = tl.load(entropy_ptr + row)
        # p * (log p + H) is 0 * (-inf) = NaN on -inf logits; the term is exactly 0 where p == 0.
        grad -= h * tl.where(p > 0.0, p * (logp + ent), 0.0)
    tl.store(out_ptr, (grad * inv_temperature).to(dlogits_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Host wrappers
# ----------------------------------------------------------------------------------------------------------


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _auto_num_splits(n_rows: int, n_cols: int, device: torch.device) -> int:
    if device.type == "cuda":
        sm = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        sm = _DEFAULT_SM_COUNT
    # With >= 2 rows per SM every SM already streams whole rows; splitting only adds the combine step.
    if n_rows >= 2 * sm:
        return 1
    # Otherwise aim for ~4 programs per SM (enough loads in flight to saturate HBM) without slices
    # shorter than _MIN_COLS_PER_SPLIT.
    return max(1, min(triton.cdiv(4 * sm, n_rows), n_cols // _MIN_COLS_PER_SPLIT, _MAX_SPLITS))


def _check_logits_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [N, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError(f"logits must have unit stride along the vocabulary, got strides {logits.stride()}")
    if labels.shape != (logits.shape[0],) or labels.dtype != torch.int64 or not labels.is_contiguous():
        raise ValueError(
            f"labels must be contiguous int64 [N={logits.shape[0]}], got {labels.dtype} {tuple(labels.shape)}"
        )
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but logits on {logits.device}")


def gather_logprobs_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
    with_entropy: bool,
    *,
    num_splits: int | None = None,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Log-probability of each row's label under ``softmax(logits * inv_temperature)``, optionally entropy.

    Args:
        logits: ``[N, V]`` float32 / bfloat16 / float16, unit stride along V, any row stride.
        labels: ``int64[N]`` contiguous, each ``ignore_index`` or in ``[0, V)`` (not checked here).
        inv_temperature: ``1 / temperature`` (> 0).
        ignore_index: label value of rows to skip (their outputs are 0).
        with_entropy: also return the entropy of each row's distribution.
        num_splits: split each row over this many programs (None = chosen from N, V and the SM count).
            Mainly for tests; 1 forces the single-pass kernel.
        block_v: vocabulary block per loop step (power of two; None = automatic). Mainly for tests.

    Returns:
        ``(logprobs f32[N], stats f32[N, 2], entropy f32[N] or None)``. ``stats`` is what the backward needs:
        each row's ``(max_j z_j, log sum_j e^{z_j - max})``, ``(0, 0)`` on ignored rows.
    """
    _check_logits_labels(logits, labels)
    check_block_v(block_v)
    n_rows, n_cols = logits.shape
    device = logits.device
    logprobs = torch.empty(n_rows, dtype=torch.float32, device=device)
    stats = torch.empty((n_rows, 2), dtype=torch.float32, device=device)
    entropy = torch.empty(n_rows, dtype=torch.float32, device=device) if with_entropy else None
    if n_rows == 0:
        return logprobs, stats, entropy
    if n_cols == 0:
        raise ValueError("logits must have at least one vocabulary column")

    inv_temperature = float(inv_temperature)
    ignore_index = int(ignore_index)
    # The kernels skip unused entropy stores via the WITH_ENTROPY flag; any f32 buffer fills the slot.
    entropy_arg = entropy if entropy is not None else logprobs

    splits = _auto_num_splits(n_rows, n_cols, device) if num_splits is None else max(1, int(num_splits))
    if splits > 1:
        # Each slice is a whole number of blocks so only the row's last block is ragged.
        bv = block_v or row_block_v(triton.cdiv(n_cols, splits))
        cols_per_split = triton.cdiv(triton.cdiv(n_cols, splits), bv) * bv
        splits = min(triton.cdiv(n_cols, cols_per_split), _MAX_SPLITS)
        cols_per_split = triton.cdiv(triton.cdiv(n_cols, splits), bv) * bv

    with device_context(logits):
        if splits <= 1:
            bv = block_v or row_block_v(n_cols)
            _gather_logprobs_fwd_kernel[(n_rows,)](
                logprobs,
                stats,
                entropy_arg,
                logits,
                labels,
                logits.stride(0),
                n_cols,
                inv_temperature,
                ignore_index,
                BLOCK_V=bv,
                WITH_ENTROPY=with_entropy,
                num_warps=row_num_warps(bv),
            )
            return logprobs, stats, entropy

        partial = torch.empty((n_rows, 3, splits), dtype=torch.float32, device=device)
        _gather_logprobs_fwd_partial_kernel[(n_rows, splits)](
            partial,
            logits,
            labels,
            logits.stride(0),
            n_cols,
            cols_per_split,
            splits,
            inv_temperature,
            ignore_index,
            BLOCK_V=bv,
            WITH_ENTROPY=with_entropy,
            num_warps=row_num_warps(bv),
        )
        block_s = max(MIN_BLOCK_V, triton.next_power_of_2(splits))
        _gather_logprobs_fwd_combine_kernel[(n_rows,)](
            logprobs,
            stats,
            entropy_arg,
            partial,
            logits,
            labels,
            logits.stride(0),
            splits,
            inv_temperature,
            ignore_index,
            BLOCK_S=block_s,
            WITH_ENTROPY=with_entropy,
            num_warps=1 if block_s <= 128 else 4,
        )
    return logprobs, stats, entropy


def gather_logprobs_backward(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    logits: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    entropy: torch.Tensor | None,
    inv_temperature: float,
    ignore_index: int,
    out: torch.Tensor,
    *,
    block_v: int | None = None,
) -> torch.Tensor:
    """Gradient w.r.t. ``logits`` of ``sum(grad_logprobs * logprobs + grad_entropy * entropy)``.

    Args:
        grad_logprobs: ``f32[N]``.
        grad_entropy: ``f32[N]`` or None (treated as zeros; then ``entropy`` is not needed).
        logits, labels, inv_temperature, ignore_index: as given to the forward.
        stats: ``f32[N, 2]`` saved by the forward; entropy: ``f32[N]`` from the forward, or None.
        out: ``[N, V]`` in the logits dtype, unit stride along V, any row stride; may be ``logits`` itself.
        block_v: vocabulary block per program (power of two; None = automatic). Mainly for tests.

    Returns:
        ``out``, holding ``inv_T * (g (onehot - p) - h p (log p + H))``, zero on ignored rows.
    """
    _check_logits_labels(logits, labels)
    check_block_v(block_v)
    n_rows, n_cols = logits.shape
    if out.shape != logits.shape or out.dtype != logits.dtype or out.device != logits.device:
        raise ValueError(
            f"out must be {logits.dtype} {tuple(logits.shape)} on {logits.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    if n_cols > 1 and out.stride(1) != 1:
        raise ValueError(f"out must have unit stride along the vocabulary, got strides {out.stride()}")
    if stats.shape != (n_rows, 2):
        raise ValueError(f"stats must be the forward's [{n_rows}, 2] stats, got shape {tuple(stats.shape)}")
    if grad_entropy is not None and entropy is None:
        raise ValueError("grad_entropy needs the entropy saved by the forward (with_entropy=True)")
    if n_rows == 0 or n_cols == 0:
        return out

    # Autograd may hand in expanded (stride-0) or non-f32 gradients; these are only N elements.
    grad_logprobs = grad_logprobs.to(torch.float32).contiguous()
    stats = stats.to(torch.float32).contiguous()
    with_entropy_grad = grad_entropy is not None
    if with_entropy_grad:
        grad_entropy = grad_entropy.to(torch.float32).contiguous()
        entropy = entropy.to(torch.float32).contiguous()
    else:
        grad_entropy = entropy = grad_logprobs  # unused slots, skipped via WITH_ENTROPY_GRAD=False

    bv = block_v or row_block_v(n_cols)
    grid = (n_rows, triton.cdiv(n_cols, bv))
    with device_context(logits):
        _gather_logprobs_bwd_kernel[grid](
            out,
            grad_logprobs,
            grad_entropy,
            logits,
            labels,
            stats,
            entropy,
            out.stride(0),
            logits.stride(0),
            n_cols,
            float(inv_temperature),
            int(ignore_index),
            BLOCK_V=bv,
            WITH_ENTROPY_GRAD=with_entropy_grad,
            num_warps=row_num_warps(bv),
        )
    return out
