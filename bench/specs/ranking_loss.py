"""ranking_loss: InstructGPT's K-wise loss over all C(K,2) pairs of each prompt's ``[K]`` rewards."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastrlhf.ops import ranking_loss
from specs._base import Case, Provider, Target, compiled_provider, kernel_providers, with_call_overhead

OP = "ranking_loss"
MODES = ("fwd", "bwd", "full")
DTYPES = {"cpu": ["fp32"], "cuda": ["fp32"]}
SIZES = {"cpu": [(512, 4), (512, 9), (8192, 9)], "cuda": [(512, 9), (8192, 9), (65536, 9)]}
QUICK_SIZES = [(64, 4), (64, 9)]
# The smallest valid input: its time is the cost of a call (dispatch, checks, launches), not of work.
CALL_SIZE = (2, 3)
TARGETS = [
    Target("full", "N=512,K=9", "cpu", "speedup", 3.0, source="forward+backward ≥ 3x eager"),
    Target("fwd", "N=2,K=3", "cpu", "call_us", 10.0, source="cost of a call ≤ 10 µs"),
]


def cases(device: str, quick: bool) -> list[Case]:
    sizes = QUICK_SIZES if quick else SIZES[device]
    return with_call_overhead(
        [Case(f"N={n},K={k}", n * k * (k - 1) // 2, {"prompts": n, "k": k}) for n, k in [CALL_SIZE, *sizes]]
    )


def make_inputs(case, device, dtype, requires_grad, generator):
    n, k = case.params["prompts"], case.params["k"]
    ranks = torch.stack([torch.randperm(k, generator=generator) + 1 for _ in range(n)])
    return {
        "rewards": torch.randn(n, k, generator=generator).to(device).requires_grad_(requires_grad),
        "ranks": ranks.to(device),
        "mask": torch.ones(n, k, dtype=torch.bool, device=device),
    }


def eager(inputs):
    """The ``[N, K, K]`` pair expansion a reward-model trainer writes: every (better, worse) pair's
    -logσ(r_w - r_l), mean per prompt, mean over prompts."""
    rewards, ranks, mask = inputs["rewards"], inputs["ranks"], inputs["mask"]
    pair = mask[:, :, None] & mask[:, None, :] & (ranks[:, :, None] < ranks[:, None, :])
    losses = -F.logsigmoid(rewards[:, :, None] - rewards[:, None, :]) * pair
    per_prompt = losses.sum((1, 2)) / pair.sum((1, 2)).clamp_min(1)
    return per_prompt.mean()


def providers(device: str) -> list[Provider]:
    return [
        Provider("eager", eager),
        compiled_provider(eager, device),
        *kernel_providers(
            device,
            lambda b: (
                lambda inputs: (
                    ranking_loss(inputs["rewards"], inputs["ranks"], inputs["mask"], backend=b).loss
                )
            ),
        ),
    ]


def bytes_moved(case, dtype, mode):
    return None  # a few bytes per pair of compute: not memory-bound
