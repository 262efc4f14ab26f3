"""compute_advantages: the whole experience step after a rollout (KL-shaped token rewards, the score at
the last token, GAE, masked whitening), against the eager sequence of ops a veRL-style trainer runs."""

from __future__ import annotations

import torch

from fastrlhf.ops import compute_advantages
from specs._base import Case, Provider, kernel_providers, random_mask, with_call_overhead

OP = "compute_advantages"
MODES = ("fwd",)
DTYPES = {"cpu": ["fp32"], "cuda": ["fp32"]}
SIZES = {"cpu": [(64, 512), (64, 2048), (256, 2048)], "cuda": [(64, 2048), (256, 8192)]}
QUICK_SIZES = [(16, 64), (16, 256)]
# The smallest valid input: its time is the cost of a call (dispatch, checks, launches), not of work.
CALL_SIZE = (2, 8)
GAMMA, LAM, KL_COEF = 1.0, 0.95, 0.02
TARGETS = []
NO_COMPILE = "its GAE is a T-step Python loop: torch.compile unrolls all T steps, and compiling dominates"


def cases(device: str, quick: bool) -> list[Case]:
    sizes = QUICK_SIZES if quick else SIZES[device]
    return with_call_overhead(
        [Case(f"B={b},T={t}", b * t, {"batch": b, "length": t}) for b, t in [CALL_SIZE, *sizes]]
    )


def make_inputs(case, device, dtype, requires_grad, generator):
    shape = (case.params["batch"], case.params["length"])
    logp = -torch.rand(shape, generator=generator) * 5
    return {
        "scores": torch.randn(shape[0], generator=generator).to(device),
        "logp": logp.to(device),
        "ref": (logp + 0.3 * torch.randn(shape, generator=generator)).to(device),
        "values": torch.randn(shape, generator=generator).to(device),
        "mask": random_mask(shape, generator, device),
    }


def eager(inputs):
    """veRL's sequence (apply_kl_penalty → compute_gae_advantage_return → masked_whiten), restated."""
    mask = inputs["mask"].float()
    kl = (inputs["logp"] - inputs["ref"]) * mask
    rewards = -KL_COEF * kl
    last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & inputs["mask"]  # the last valid token
    rewards = rewards + last * inputs["scores"][:, None]
    values = inputs["values"]
    next_values = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    reversed_adv = []
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + GAMMA * next_values - values[:, t]
        step = delta + GAMMA * LAM * running
        m = mask[:, t]
        next_values = values[:, t] * m + (1 - m) * next_values
        running = step * m + (1 - m) * running
        reversed_adv.append(running)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    returns = advantages + values
    mean = (advantages * mask).sum() / mask.sum()
    var = (((advantages - mean) ** 2) * mask).sum() / (mask.sum() - 1)
    return ((advantages - mean) * torch.rsqrt(var + 1e-8)) * mask, returns


def providers(device: str) -> list[Provider]:
    return [
        Provider("eager", eager, modes=MODES),
        Provider("torch.compile", None, NO_COMPILE),
        *(
            Provider(p.name, p.fn, p.reason, modes=MODES)
            for p in kernel_providers(
                device,
                lambda b: (
                    lambda inputs: (
                        compute_advantages(
                            inputs["scores"],
                            inputs["logp"],
                            inputs["ref"],
                            inputs["values"],
                            inputs["mask"],
                            kl_coef=KL_COEF,
                            gamma=GAMMA,
                            lam=LAM,
                            backend=b,
                        ).advantages
                    )
                ),
            )
        ),
    ]


def bytes_moved(case, dtype, mode):
    """Read logp, ref, values (fp32) and the mask; write token rewards, advantages, returns; the whitening
    reads and writes the advantages once more."""
    n = case.params["batch"] * case.params["length"]
    return n * (3 * 4 + 1 + 3 * 4 + 2 * 4)
