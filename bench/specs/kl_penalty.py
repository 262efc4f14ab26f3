"""kl_penalty, estimator k3, per token over ``[B, T]`` with a bool action mask.

Each size runs with gradients to both inputs. ``LOSS_CASES`` add the two ways a trainer uses the KL:
- a frozen reference (``ref`` without a gradient), as in PPO and GRPO, where the reference log-probs
  come from a model under no_grad, so the backward writes one gradient instead of two;
- and, on top of that, the GRPO-style KL loss: the masked mean over every valid token (``token-mean``),
  a scalar, so no per-token output is written or summed.
Every provider gets the same inputs and computes the same quantity.
"""

from __future__ import annotations

import torch

from fastrlhf.ops import kl_penalty
from specs._base import Case, Provider, Target, compiled_provider, kernel_providers, with_call_overhead

OP = "kl_penalty"
MODES = ("fwd", "bwd", "full")
DTYPES = {"cpu": ["fp32"], "cuda": ["fp32"]}
SIZES = {"cpu": [(64, 2048), (256, 2048), (256, 8192)], "cuda": [(64, 2048), (256, 8192), (1024, 8192)]}
QUICK_SIZES = [(16, 256), (64, 512)]
# (batch, length, reduction) with a frozen reference, per device.
LOSS_CASES = {
    "cpu": [(64, 2048, "none"), (64, 2048, "token-mean")],
    "cuda": [(256, 8192, "none"), (256, 8192, "token-mean")],
}
# The smallest valid input: its time is the cost of a call (dispatch, checks, launches), not of work.
CALL_SIZE = (2, 8)
TARGETS = [
    Target("full", "B=64,T=2048", "cpu", "speedup", 3.0, source="forward+backward ≥ 3x eager, 131k tokens"),
    Target("full", "B=256,T=8192", "cpu", "speedup", 3.0, source="forward+backward ≥ 3x eager, 2M tokens"),
    Target(
        "full",
        "B=256,T=8192",
        "cpu",
        "copy_fraction",
        0.8,
        source="forward+backward at 2M tokens ≥ 80% of the copy bandwidth: at the memory limit",
    ),
    Target("fwd", "B=2,T=8", "cpu", "call_us", 10.0, source="cost of a call ≤ 10 µs"),
]


def cases(device: str, quick: bool) -> list[Case]:
    sizes = QUICK_SIZES if quick else SIZES[device]
    both = [Case(f"B={b},T={t}", b * t, {"batch": b, "length": t}) for b, t in [CALL_SIZE, *sizes]]
    frozen = [
        Case(
            f"B={b},T={t},frozen-ref" + ("" if reduction == "none" else f",{reduction}"),
            b * t,
            {"batch": b, "length": t, "frozen_ref": True, "reduction": reduction},
        )
        for b, t, reduction in ([] if quick else LOSS_CASES[device])
    ]
    return with_call_overhead(both + frozen)


def make_inputs(case, device, dtype, requires_grad, generator):
    shape = (case.params["batch"], case.params["length"])
    logp = -torch.rand(shape, generator=generator) * 5
    ref = logp + torch.randn(shape, generator=generator) * 0.5
    mask = torch.rand(shape, generator=generator) > 0.1  # bool, as a trainer's action mask is
    ref_grad = requires_grad and not case.params.get("frozen_ref", False)
    return {
        "logp": logp.to(dtype).to(device).requires_grad_(requires_grad),
        "ref": ref.to(dtype).to(device).requires_grad_(ref_grad),
        "mask": mask.to(device),
        "reduction": case.params.get("reduction", "none"),
    }


def eager(inputs):
    """k3 = exp(ref - logp) - (ref - logp) - 1, masked: the textbook composition."""
    log_ratio = inputs["ref"] - inputs["logp"]
    return reduce(inputs, (torch.exp(log_ratio) - log_ratio - 1) * inputs["mask"])


def verl_low_var_kl(inputs):
    """veRL's kl_penalty(..., "low_var_kl") (verl/trainer/ppo/core_algos.py), restated: k3 clamped to
    [-10, 10], then masked as its callers do."""
    kl = inputs["ref"] - inputs["logp"]
    kl = torch.clamp(kl, min=-20, max=20)
    ratio = torch.exp(kl)
    kld = (ratio - kl - 1).contiguous()
    return reduce(inputs, torch.clamp(kld, min=-10, max=10) * inputs["mask"])


def reduce(inputs, masked_kl):
    """The per-token masked KL as is, or its mean over the valid tokens (the KL loss's token-mean)."""
    if inputs["reduction"] == "none":
        return masked_kl
    return masked_kl.sum() / inputs["mask"].sum()


def providers(device: str) -> list[Provider]:
    return [
        Provider("eager", eager),
        compiled_provider(eager, device),
        Provider("verl-eager", verl_low_var_kl),
        *kernel_providers(
            device,
            lambda b: (
                lambda inputs: kl_penalty(
                    inputs["logp"],
                    inputs["ref"],
                    inputs["mask"],
                    "k3",
                    reduction=inputs["reduction"],
                    backend=b,
                )
            ),
        ),
        # Clamped to [-10, 10] like veRL's low_var_kl: the like-for-like row against ``verl-eager``.
        *kernel_providers(
            device,
            lambda b: (
                lambda inputs: kl_penalty(
                    inputs["logp"],
                    inputs["ref"],
                    inputs["mask"],
                    "k3",
                    clamp=10.0,
                    reduction=inputs["reduction"],
                    backend=b,
                )
            ),
            suffix="-clamped",
        ),
    ]


def bytes_moved(case, dtype, mode):
    """fwd: read logp, ref, mask; write kl (per token only). bwd: read the upstream gradient (per token
    only), logp, ref, mask; write two gradients (one with a frozen reference)."""
    n = case.params["batch"] * case.params["length"]
    elt = torch.empty(0, dtype=dtype).element_size()
    per_token = case.params.get("reduction", "none") == "none"
    gradients = 1 if case.params.get("frozen_ref", False) else 2
    forward = n * ((2 + per_token) * elt + 1)
    backward = n * ((2 + per_token + gradients) * elt + 1)
    return {"fwd": forward, "bwd": backward, "full": forward + backward}[mode]
