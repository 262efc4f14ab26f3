"""TRL-signature functions on fastrlhf's fused log-prob kernel, and ``patch()`` to swap them into TRL.

Semantics follow ``trl/trainer/utils.py`` (TRL 1.16): ``selective_log_softmax``,
``selective_log_softmax_and_entropy`` and ``entropy_from_logits``. Each is a thin adapter over
``fastrlhf.ops.gather_logprobs``; the differences from TRL, all deliberate:

- Results are float32 (float64 for float64 logits) whatever the logits dtype, as TRL's own CUDA kernel
  returns them; TRL's CPU path returns the logits dtype (and computes bf16 log-softmax in bf16).
- Where ``row_mask`` is 0 the index is never read, so padding may hold any value (TRL gathers it first
  and fails on an out-of-range pad id on its CPU path).
- The entropy of a distribution with ``-inf`` logits is finite (``p·log p = 0`` at ``p = 0``); TRL's CPU
  path gives NaN there.
- With a ``[..., K]`` index in bf16/fp16, d(logits) may differ from TRL's by about one ulp of the summed
  upstream gradient at one column per position (see ``_select_top_k``); values are fp32-exact.
- ``entropy_from_logits``'s ``chunk_size`` is accepted and ignored: the kernel never holds a ``[N, V]``
  temporary, so there is nothing to chunk.
"""

from __future__ import annotations

import torch

from fastrlhf.compat._patching import PatchHandle, Target, apply, unpatch_all
from fastrlhf.ops import gather_logprobs

__all__ = [
    "entropy_from_logits",
    "patch",
    "selective_log_softmax",
    "selective_log_softmax_and_entropy",
    "unpatch",
]

# The label we give masked positions: the op skips it (0, no gradient). int64's minimum can never be a
# real index, so an out-of-range index at an unmasked position still raises, as it does in TRL.
_SKIP = torch.iinfo(torch.int64).min


def _check_temperature(temperature: float) -> None:
    # TRL's own check and message, so callers that match on it keep working.
    if temperature <= 0:
        raise ValueError("temperature must be positive")


def _select(logits, index, temperature, row_mask, with_entropy):
    """(logprobs shaped like ``index``, entropy ``[...]`` or None) for either index layout."""
    _check_temperature(temperature)
    lead = tuple(logits.shape[:-1])
    if index.dim() not in (len(lead), len(lead) + 1) or tuple(index.shape[: len(lead)]) != lead:
        raise ValueError(
            f"index has shape {tuple(index.shape)}; for logits {tuple(logits.shape)} "
            f"it must be {lead} or {lead} + (K,)"
        )
    if row_mask is not None and row_mask.shape != index.shape:
        raise ValueError(
            f"row_mask has shape {tuple(row_mask.shape)}; it must match index {tuple(index.shape)}"
        )
    keep = None if row_mask is None else row_mask != 0
    if index.dim() == len(lead):
        labels = index.long()
        if keep is not None:
            labels = torch.where(keep, labels, _SKIP)
        out = gather_logprobs(logits, labels, temperature, ignore_index=_SKIP, return_entropy=with_entropy)
        return out if with_entropy else (out, None)
    return _select_top_k(logits, index.long(), temperature, keep, with_entropy)


def _select_top_k(logits, index, temperature, keep, with_entropy):
    """K log-probs per position with one kernel pass, not K.

    log-softmax is shift-invariant, so ``logp[k] = logp[a] + (x[k] - x[a]) / T`` for any anchor ``a`` in
    the row. The kernel gives ``logp[a]`` for one label per position; ``a`` is the largest of the K
    gathered logits, so the difference is never ``-inf - (-inf)`` unless every one of the K is ``-inf``
    (then all K are ``-inf``: ``logp[a]`` is ``-inf`` and the shift is taken as 0).

    Precision: values are exact to fp32 rounding in every dtype. d(logits) at the anchor column is the sum
    of the kernel's ``G·(1 - p_a)`` and the shift's ``-G`` (``G = Σ_k g_k``), each rounded to the logits
    dtype, so in bf16/fp16 it can be off by about one ulp of ``Σ_k |g_k|``; K kernel calls would avoid
    that at K times the cost, and a ``gather_logprobs`` taking K labels per row would avoid both.
    """
    if keep is not None:
        index = torch.where(keep, index, 0)  # masked entries may hold pad ids; any valid column will do
    picked = logits.gather(-1, index)
    picked = picked.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    candidates = picked if keep is None else picked.masked_fill(~keep, float("-inf"))
    if index.shape[-1] == 0:  # nothing to select; the entropy still needs one (any) label per position
        candidates = torch.zeros((*index.shape[:-1], 1), dtype=picked.dtype, device=picked.device)
        index = torch.zeros_like(candidates, dtype=torch.int64)
    anchor = candidates.argmax(-1, keepdim=True)
    anchor_label = index.gather(-1, anchor).squeeze(-1)
    if keep is not None:
        anchor_label = torch.where(keep.any(-1), anchor_label, _SKIP)
    out = gather_logprobs(logits, anchor_label, temperature, ignore_index=_SKIP, return_entropy=with_entropy)
    anchor_logprob, entropy = out if with_entropy else (out, None)
    if picked.shape[-1] == 0:
        return picked, entropy
    anchor_logit = picked.gather(-1, anchor)
    # Only an all--inf row needs the guard; elsewhere the difference must stay differentiable even at ties.
    shift = torch.where(torch.isneginf(anchor_logit), 0.0, (picked - anchor_logit) / temperature)
    logprobs = anchor_logprob.unsqueeze(-1) + shift
    if keep is not None:
        logprobs = logprobs.masked_fill(~keep, 0.0)
    return logprobs, entropy


def selective_log_softmax(
    logits: torch.Tensor,
    index: torch.Tensor,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``log_softmax(logits / temperature)`` gathered at ``index``, without the ``[..., V]`` log-softmax.

    Args:
        logits: ``[..., V]`` float32 / bfloat16 / float16 / float64.
        index: ``[...]`` (one log-prob per position) or ``[..., K]`` (K per position, e.g. top-K), integer.
        temperature: > 0.
        row_mask: the shape of ``index``, or None; where it is 0 the result is 0 with zero gradient.
    Returns:
        The shape of ``index``, float32 (float64 for float64 logits).
    """
    return _select(logits, index, temperature, row_mask, with_entropy=False)[0]


def selective_log_softmax_and_entropy(
    logits: torch.Tensor,
    index: torch.Tensor,
    entropy_requires_grad: bool = True,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selected log-probs and each position's entropy, from one pass over the logits.

    Args:
        logits: ``[..., V]``. index: ``[...]`` (or ``[..., K]``). row_mask: ``[...]`` like ``index``, or None.
        entropy_requires_grad: False detaches the entropy (the backward then skips its term).
    Returns:
        ``(logprobs, entropy[...])``: the entropy of ``softmax(logits / temperature)``, 0 where ``row_mask``
        is 0 (for a ``[..., K]`` index: where all K entries are 0).
    """
    logprobs, entropy = _select(logits, index, temperature, row_mask, with_entropy=True)
    return logprobs, entropy if entropy_requires_grad else entropy.detach()


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """Entropy (nats) of ``softmax(logits)`` over the last dim: ``[..., V]`` → ``[...]`` float32.

    ``chunk_size`` is accepted for TRL's signature and ignored (the kernel streams over V already).
    """
    labels = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    return gather_logprobs(logits, labels, return_entropy=True)[1]


def _targets() -> list[Target]:
    module = "trl.trainer.utils"
    return [
        Target(module, "selective_log_softmax", selective_log_softmax),
        # Both arrived in later TRL releases; older ones simply don't have them.
        Target(module, "selective_log_softmax_and_entropy", selective_log_softmax_and_entropy, optional=True),
        Target(module, "entropy_from_logits", entropy_from_logits, optional=True),
    ]


def patch() -> PatchHandle:
    """Make the installed TRL call fastrlhf's kernels.

    Swaps ``trl.trainer.utils.selective_log_softmax`` (and ``selective_log_softmax_and_entropy``,
    ``entropy_from_logits`` where TRL has them) and every copy a loaded ``trl.*`` module imported by name.
    Returns a handle: ``handle.unpatch()`` (or ``with patch(): ...``) restores TRL. Without TRL installed
    it warns and returns an empty handle.
    """
    return apply("trl", "trl", _targets())


def unpatch() -> None:
    """Undo every active ``patch()`` of TRL."""
    unpatch_all("trl")
