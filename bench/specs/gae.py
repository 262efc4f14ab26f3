"""gae over ``[B, T]`` right-padded responses (no gradient: forward only). The eager baseline is TRL's /
OpenRLHF's reverse loop over time, vectorised over the batch; veRL's mask-carry loop is the other peer."""

from __future__ import annotations

import torch

from fastrlhf.ops import gae
from specs._base import Case, Provider, Target, kernel_providers, random_mask, with_call_overhead

OP = "gae"
MODES = ("fwd",)
DTYPES = {"cpu": ["fp32"], "cuda": ["fp32"]}
SIZES = {"cpu": [(64, 512), (64, 2048), (64, 8192)], "cuda": [(64, 2048), (256, 8192)]}
QUICK_SIZES = [(16, 64), (16, 256)]
# The smallest valid input: its time is the cost of a call (dispatch, checks, launches), not of work.
CALL_SIZE = (2, 8)
GAMMA, LAM = 1.0, 0.95
TARGETS = [
    Target("fwd", "B=64,T=2048", "cpu", "speedup", 150.0, source="≥ 150x the time-step loop"),
]
NO_COMPILE = "a T-step Python loop: torch.compile unrolls all T steps, and compiling dominates any run"


def cases(device: str, quick: bool) -> list[Case]:
    sizes = QUICK_SIZES if quick else SIZES[device]
    return with_call_overhead(
        [Case(f"B={b},T={t}", b * t, {"batch": b, "length": t}) for b, t in [CALL_SIZE, *sizes]]
    )


def make_inputs(case, device, dtype, requires_grad, generator):
    shape = (case.params["batch"], case.params["length"])
    return {
        "rewards": torch.randn(shape, generator=generator).to(dtype).to(device),
        "values": torch.randn(shape, generator=generator).to(dtype).to(device),
        "mask": random_mask(shape, generator, device).to(dtype),
    }


def trl_loop(inputs):
    """TRL / OpenRLHF (openrlhf/models/... get_advantages_and_returns): reverse loop, right padding."""
    mask = inputs["mask"]
    rewards, values = inputs["rewards"] * mask, inputs["values"] * mask
    length = rewards.shape[1]
    last = 0
    reversed_adv = []
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + GAMMA * next_values - values[:, t]
        last = delta + GAMMA * LAM * last
        reversed_adv.append(last)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    return advantages + values


def verl_loop(inputs):
    """veRL (verl/trainer/ppo/core_algos.py, compute_gae_advantage_return): the mask-carry loop."""
    rewards, values, mask = inputs["rewards"], inputs["values"], inputs["mask"]
    next_values = torch.zeros_like(values[:, 0])
    last = torch.zeros_like(values[:, 0])
    reversed_adv = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + GAMMA * next_values - values[:, t]
        step = delta + GAMMA * LAM * last
        m = mask[:, t]
        next_values = values[:, t] * m + (1 - m) * next_values
        last = step * m + (1 - m) * last
        reversed_adv.append(last)
    return torch.stack(reversed_adv[::-1], dim=1) + values


def providers(device: str) -> list[Provider]:
    return [
        Provider("eager", trl_loop, modes=MODES),
        Provider("torch.compile", None, NO_COMPILE),
        Provider("verl-loop", verl_loop, modes=MODES),
        *(
            Provider(p.name, p.fn, p.reason, modes=MODES)
            for p in kernel_providers(
                device,
                lambda b: (
                    lambda inputs: gae(
                        inputs["rewards"], inputs["values"], inputs["mask"], GAMMA, LAM, backend=b
                    )[1]
                ),
            )
        ),
    ]


def bytes_moved(case, dtype, mode):
    """Read rewards, values, mask; write advantages and returns."""
    n = case.params["batch"] * case.params["length"]
    return n * 5 * torch.empty(0, dtype=dtype).element_size()
