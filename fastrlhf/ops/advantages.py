"""compute_advantages: the PPO experience step after a rollout, in one call.

    token reward  = -kl_coef · KL(logprobs ‖ ref_logprobs)        per valid token
                  + score                                         at each row's last valid token
    advantages, returns = GAE(token rewards, values)              mask-carry semantics
    advantages    = masked_whiten(advantages)                     optional

On the kernel backends the first three lines are one fused pass per row (KL, score placement and the
reverse GAE walk together); whitening is a masked reduction on top. The cpp and cuda backends run the
TORCH_LIBRARY op ``torch.ops.fastrlhf.compute_advantages`` (csrc/advantages_op.cpp): checks, the fused pass
and the whitening are C++, so a call costs little more than the dispatcher. The Triton backend is a Python
custom op with the whitening in torch on top.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastrlhf.ops import reference
from fastrlhf.ops._backend import COMPILED_OP_BACKENDS, pick_backend, runs_compiled_op
from fastrlhf.ops._common import check_discount, check_sequences
from fastrlhf.ops._compiled import CompiledOp
from fastrlhf.ops._dispatch import kernel_op
from fastrlhf.ops._kernels import triton_module
from fastrlhf.ops._validation import FLOAT_DTYPES, check_finite, check_same_device, check_tensor
from fastrlhf.ops.gae import check_whiten_count
from fastrlhf.ops.kl_penalty import check_clamp, check_estimator

_COMPUTE_ADVANTAGES = CompiledOp("compute_advantages")


class Advantages(NamedTuple):
    """All ``[B, T]`` float32, 0 at masked positions."""

    token_rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def compute_advantages(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
    gamma: float = 1.0,
    lam: float = 0.95,
    score_clip: float | None = None,
    whiten: bool = True,
    kl_clamp: float | None = None,
    backend: str = "auto",
) -> Advantages:
    """KL-shaped token rewards, GAE advantages (whitened if asked) and returns, with no gradient.

    Args:
        scores: ``[B]`` sequence scores (the reward model's output).
        logprobs, ref_logprobs, values: ``[B, T]`` over the response tokens.
        mask: ``[B, T]`` 0/1 or bool, the valid response tokens.
        kl_coef: β of the per-token penalty ``-β·KL`` (finite, >= 0).
        estimator: the KL estimator ("k1", "k2", "k3", "abs"); kl_clamp bounds it (None: no bound).
        gamma, lam: GAE discount and λ, in [0, 1].
        score_clip: clip scores to ``[-score_clip, score_clip]`` first (None: no clipping).
        whiten: whiten the advantages over the masked tokens (needs at least 2 of them).
    """
    if runs_compiled_op(backend, scores, logprobs, ref_logprobs, values, mask):
        try:
            args = (kl_coef, estimator, gamma, lam, score_clip, whiten, kl_clamp)
            return Advantages(*_COMPUTE_ADVANTAGES(scores, logprobs, ref_logprobs, values, mask, *args))
        except TypeError:  # an argument of a type the schema does not take: the checks below name it
            pass
    check_tensor("scores", scores, FLOAT_DTYPES)
    mask_u8 = check_sequences(values, mask, logprobs=logprobs, ref_logprobs=ref_logprobs)
    if scores.shape != (values.shape[0],):
        raise ValueError(
            f"scores has shape {tuple(scores.shape)}; expected ({values.shape[0]},), one per row"
        )
    device = check_same_device(
        scores=scores, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, mask=mask
    )
    kl_coef = check_finite("kl_coef", kl_coef)
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    code = check_estimator(estimator)
    clamp_value = check_clamp(kl_clamp, "kl_clamp")
    kl_clamp = None if kl_clamp is None else clamp_value  # a number given as a str goes on as a float
    gamma = check_discount("gamma", gamma)
    lam = check_discount("lam", lam)
    clip = None if score_clip is None else check_clamp(score_clip, "score_clip")

    chosen = pick_backend(backend, device, dict(values=values), fp32_copies=True)
    if chosen in COMPILED_OP_BACKENDS.values():
        args = (kl_coef, estimator, gamma, lam, clip, bool(whiten), kl_clamp)
        out = _COMPUTE_ADVANTAGES(scores, logprobs, ref_logprobs, values, mask, *args)
        return Advantages(*out)
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    with torch.no_grad():
        if chosen == "torch":
            token_rewards, advantages, returns = reference.compute_advantages(
                scores, logprobs, ref_logprobs, values, mask_u8, kl_coef, estimator, gamma, lam, kl_clamp
            )
        else:
            if ref_logprobs.dtype != logprobs.dtype or logprobs.dtype == torch.float64:
                logprobs, ref_logprobs = logprobs.float(), ref_logprobs.float()
            token_rewards, advantages, returns = _advantages_triton_op(
                scores.detach().float().contiguous(),
                logprobs.detach().contiguous(),
                ref_logprobs.detach().contiguous(),
                values.detach().float().contiguous(),
                mask_u8.contiguous(),
                kl_coef,
                code,
                clamp_value,
                gamma,
                lam,
            )
        if whiten:
            # The mask is checked already (check_sequences): whiten without a second data-dependent pass.
            check_whiten_count(mask_u8)
            advantages = reference.masked_whiten(advantages, mask_u8)
    return Advantages(token_rewards, advantages, returns)


# The Triton backend's custom op (the compiled backends have the C++ op, csrc/advantages_op.cpp).
@kernel_op("fastrlhf::advantages_fwd")
def _advantages_triton_op(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: int,
    clamp: float,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scores f32 ``[B]``; logprobs, ref_logprobs ``[B, T]`` (one dtype); values f32 ``[B, T]``; mask uint8
    ``[B, T]`` → (token_rewards, advantages, returns) f32 ``[B, T]``, without whitening."""
    out = triton_module("advantages").advantages_forward(
        scores, logprobs, ref_logprobs, values, mask, kl_coef, estimator, clamp, gamma, lam
    )
    return tuple(out)


@_advantages_triton_op.register_fake
def _(scores, logprobs, ref_logprobs, values, mask, kl_coef, estimator, clamp, gamma, lam):
    return torch.empty_like(values), torch.empty_like(values), torch.empty_like(values)
