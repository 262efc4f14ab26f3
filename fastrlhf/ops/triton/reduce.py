"""The reduction epilogue the Triton kernels share: per-segment partial sums to one mean, on the device.

A kernel that reduces writes, per segment (a fixed span of tokens for KL's token-mean, a prompt for the
ranking loss), its numerator sums and a count. ``mean_of_sums`` adds them up in one program, in index
order (the same result on every run: no atomics), and writes

    mean_a = Σ a / max(Σ w, 1),  mean_b = Σ b / max(Σ w, 1),  normalizer = max(Σ w, 1),  empty = #(w == 0)

where ``w`` is the count itself, or 1 for a segment whose count is positive (``indicator``: the ranking
loss's mean over the prompts that have a pair). Everything stays on the device: no host sync, and two
launches for a whole reduced op (the segments' kernel and this) instead of the 5-10 torch ops of the same
mean written in torch. The backward reads ``normalizer`` instead of recounting.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import device_context

__all__ = ["mean_of_sums"]

# Segments per loop step of the one program: a few thousand partial sums (2M tokens in 16k-token
# segments are 128) take one or two steps.
_BLOCK = 1024


@triton.jit
def _mean_of_sums_kernel(
    mean_a_ptr,
    mean_b_ptr,
    normalizer_ptr,
    empty_ptr,
    a_ptr,
    b_ptr,
    count_ptr,
    n_segments,
    BLOCK: tl.constexpr,
    HAS_B: tl.constexpr,
    INDICATOR: tl.constexpr,
    HAS_EMPTY: tl.constexpr,
):
    """One program. a_ptr, b_ptr: f32[S] per-segment sums (b only read when HAS_B); count_ptr: [S] counts
    (int32, or any dtype when INDICATOR). Writes f32 scalars, and the int64 count of empty segments."""
    sum_a = tl.zeros([BLOCK], dtype=tl.float32)
    sum_b = tl.zeros([BLOCK], dtype=tl.float32)
    weight = tl.zeros([BLOCK], dtype=tl.int32)
    empty = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, n_segments, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < n_segments
        count = tl.load(count_ptr + offs, mask=inb, other=0)
        if INDICATOR:
            weight += (count > 0).to(tl.int32)
        else:
            weight += count.to(tl.int32)
        if HAS_EMPTY:
            empty += (inb & (count == 0)).to(tl.int32)
        sum_a += tl.load(a_ptr + offs, mask=inb, other=0.0)
        if HAS_B:
            sum_b += tl.load(b_ptr + offs, mask=inb, other=0.0)
    normalizer = tl.maximum(tl.sum(weight, axis=0), 1).to(tl.float32)
    tl.store(mean_a_ptr, tl.sum(sum_a, axis=0) / normalizer)
    if HAS_B:
        tl.store(mean_b_ptr, tl.sum(sum_b, axis=0) / normalizer)
    tl.store(normalizer_ptr, normalizer)
    if HAS_EMPTY:
        tl.store(empty_ptr, tl.sum(empty, axis=0).to(tl.int64))


def mean_of_sums(
    a: torch.Tensor,
    counts: torch.Tensor,
    b: torch.Tensor | None = None,
    *,
    indicator: bool = False,
    count_empty: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Σ a / max(Σ w, 1) over ``S`` segments, with ``w = counts`` (or ``counts > 0`` when ``indicator``).

    Args:
        a, b: ``f32[S]`` contiguous per-segment sums (``b`` optional: a second mean over the same weights).
        counts: ``[S]`` contiguous: int32 counts, or any numeric dtype when ``indicator``.
        count_empty: also count the segments whose count is 0.
    Returns:
        ``(mean_a, mean_b or None, normalizer, empty or None)``: float32 scalars (0-dim), ``empty`` int64.
        With ``S = 0``: means 0, normalizer 1, empty 0.
    """
    assert a.dim() == 1 and a.is_contiguous() and a.dtype == torch.float32
    assert counts.shape == a.shape and counts.is_contiguous()
    assert indicator or counts.dtype == torch.int32, "plain counts must be int32"
    if b is not None:
        assert b.shape == a.shape and b.is_contiguous() and b.dtype == torch.float32
    scalar = dict(dtype=torch.float32, device=a.device)
    mean_a, normalizer = torch.empty((), **scalar), torch.empty((), **scalar)
    mean_b = torch.empty((), **scalar) if b is not None else None
    empty = torch.empty((), dtype=torch.int64, device=a.device) if count_empty else None
    with device_context(a):
        _mean_of_sums_kernel[(1,)](
            mean_a,
            mean_b if mean_b is not None else mean_a,  # unused slots when their flag is off
            normalizer,
            empty if empty is not None else normalizer,
            a,
            b if b is not None else a,
            counts,
            a.numel(),
            BLOCK=_BLOCK,
            HAS_B=b is not None,
            INDICATOR=indicator,
            HAS_EMPTY=count_empty,
            num_warps=4,
        )
    return mean_a, mean_b, normalizer, empty
