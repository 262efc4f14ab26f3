"""ppo_policy_loss from ready-made log-probs over ``[B, T]``: PPO's clipped surrogate, the dual clip and a
k3 KL term, token-mean over a bool action mask, against the eager composition a trainer writes."""

from __future__ import annotations

import torch

from fastrlhf.ops import ppo_policy_loss
from specs._base import Case, Provider, Target, compiled_provider, kernel_providers, with_call_overhead

OP = "ppo_logprob_loss"
MODES = ("fwd", "bwd", "full")
DTYPES = {"cpu": ["fp32"], "cuda": ["fp32"]}
SIZES = {"cpu": [(64, 2048), (256, 2048)], "cuda": [(256, 2048), (1024, 8192)]}
QUICK_SIZES = [(16, 256), (64, 512)]
# The smallest valid input: its time is the cost of a call (dispatch, checks, launches), not of work.
CALL_SIZE = (2, 8)
CLIP, DUAL_CLIP, KL_COEF = 0.2, 3.0, 0.05
TARGETS = [Target("fwd", "B=2,T=8", "cpu", "call_us", 10.0, source="cost of a call ≤ 10 µs")]


def cases(device: str, quick: bool) -> list[Case]:
    sizes = QUICK_SIZES if quick else SIZES[device]
    return with_call_overhead(
        [Case(f"B={b},T={t}", b * t, {"batch": b, "length": t}) for b, t in [CALL_SIZE, *sizes]]
    )


def make_inputs(case, device, dtype, requires_grad, generator):
    shape = (case.params["batch"], case.params["length"])
    old = -torch.rand(shape, generator=generator) * 5
    logp = old + torch.randn(shape, generator=generator) * 0.3  # some ratios clip on each side
    ref = old + torch.randn(shape, generator=generator) * 0.5
    return {
        "logp": logp.to(dtype).to(device).requires_grad_(requires_grad),
        "old": old.to(dtype).to(device),
        "ref": ref.to(dtype).to(device),
        "adv": torch.randn(shape, generator=generator).to(dtype).to(device),
        "mask": (torch.rand(shape, generator=generator) > 0.1).to(device),
    }


def eager(inputs):
    """The textbook composition: ratio, both surrogates, the dual clip, k3 to the reference, token mean."""
    logp, adv, mask = inputs["logp"], inputs["adv"], inputs["mask"]
    log_ratio = (logp - inputs["old"]).clamp(-20, 20)
    ratio = torch.exp(log_ratio)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP))
    loss = torch.where(adv < 0, torch.minimum(loss, -adv * DUAL_CLIP), loss)
    gap = inputs["ref"] - logp
    loss = loss + KL_COEF * (torch.exp(gap) - gap - 1)
    return (loss * mask).sum() / mask.sum().clamp_min(1)


def _fused(backend):
    def run(inputs):
        return ppo_policy_loss(
            inputs["logp"],
            inputs["old"],
            inputs["adv"],
            inputs["mask"],
            clip_eps=CLIP,
            dual_clip=DUAL_CLIP,
            ref_logprobs=inputs["ref"],
            kl_coef=KL_COEF,
            backend=backend,
        ).loss

    return run


def providers(device: str) -> list[Provider]:
    kernels = [
        p if p.name != "fastrlhf-triton" else Provider(p.name, None, "the log-prob form has no Triton kernel")
        for p in kernel_providers(device, _fused)
    ]
    return [Provider("eager", eager), compiled_provider(eager, device), *kernels]


def bytes_moved(case, dtype, mode):
    """fwd: read logp, old, adv, ref, mask. bwd: the same again, write d(logp)."""
    n = case.params["batch"] * case.params["length"]
    elt = torch.empty(0, dtype=dtype).element_size()
    forward = n * (4 * elt + 1)
    backward = n * (5 * elt + 1)
    return {"fwd": forward, "bwd": backward, "full": forward + backward}[mode]
