"""group_advantages: outcome advantages of k responses per prompt (GRPO, RLOO, REINFORCE++) broadcast over
right-padded ``[B*k, T]`` responses (no gradient: forward only).

The eager baseline is fastrlhf's torch reference (vectorised segment sums, a flip-cumsum discount, masked
whitening). The veRL providers restate veRL's own code paths: its dict-of-lists grouping with a Python
loop over rows (GRPO, RLOO), its reverse loop over time (REINFORCE++), each from token-level rewards, as
veRL's trainer calls them; ``fastrlhf-verl-compat`` runs fastrlhf's drop-ins on exactly those inputs.
Each case label starts with the estimator ("grpo: B=512,k=8,T=1024"); the plot draws one line per
provider and estimator.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from fastrlhf.compat import verl as verl_compat
from fastrlhf.ops import group_advantages, reference
from specs._base import Case, Provider, compiled_provider, kernel_providers, random_mask, with_call_overhead

OP = "group_advantages"
MODES = ("fwd",)
DTYPES = {"cpu": ["fp32"], "cuda": ["fp32"]}
ESTIMATORS = ("grpo", "rloo", "reinforce++")
SIZES = {
    "cpu": [(64, 8, 1024), (512, 8, 1024), (64, 16, 4096)],
    "cuda": [(512, 8, 1024), (64, 16, 4096), (1024, 16, 4096)],
}
QUICK_SIZES = [(8, 4, 256)]
# The smallest valid input: its time is the cost of a call (dispatch, checks, launches), not of work.
CALL_SIZE = (2, 2, 8)
GAMMA, EPS = 1.0, 1e-6
TARGETS = []


def cases(device: str, quick: bool) -> list[Case]:
    sizes = QUICK_SIZES if quick else SIZES[device]

    def case(est, b, k, t):
        return Case(
            f"{est}: B={b},k={k},T={t}", b * k * t, {"estimator": est, "batch": b, "k": k, "length": t}
        )

    # The call overhead once, with GRPO (every estimator is one kernel call).
    return with_call_overhead(
        [case(ESTIMATORS[0], *CALL_SIZE)] + [case(est, *size) for est in ESTIMATORS for size in sizes]
    )


def make_inputs(case, device, dtype, requires_grad, generator):
    """Scores ``[B, k]`` (half the prompts 0/1 rewards, half Gaussian), a right-padded mask ``[B*k, T]``,
    and veRL's view of the same batch: the score on each row's last valid token, one uid per prompt. The
    estimator rides along, since a provider sees only its inputs."""
    batch, k, length = case.params["batch"], case.params["k"], case.params["length"]
    gaussian = torch.randn(batch, k, generator=generator)
    binary = (torch.rand(batch, k, generator=generator) > 0.5).float()
    scores = torch.where(torch.rand(batch, 1, generator=generator) < 0.5, binary, gaussian)
    mask = random_mask((batch * k, length), generator, "cpu")
    last = mask.sum(1) - 1  # random_mask keeps at least half of T, so every row has a token
    rewards = torch.zeros(batch * k, length)
    rewards[torch.arange(batch * k), last] = scores.reshape(-1)
    return {
        "scores": scores.to(dtype).to(device),
        "mask": mask.to(device),
        "rewards": rewards.to(dtype).to(device),
        "index": np.repeat(np.array([f"uid-{i}" for i in range(batch)], dtype=object), k),
        "estimator": case.params["estimator"],
    }


def verl_grouped(estimator):
    """veRL (verl/trainer/ppo/core_algos.py, compute_grpo_outcome_advantage and
    compute_rloo_outcome_advantage), restated: score = token rewards summed; a dict from uid to the list
    of its scores; per group a mean (and torch.std), then a Python loop writing each row's scalar."""

    def run(inputs):
        rewards, mask, index = inputs["rewards"], inputs["mask"], inputs["index"]
        scores = rewards.sum(dim=-1)
        members = defaultdict(list)
        for i in range(scores.shape[0]):
            members[index[i]].append(scores[i])
        stats = {}
        for uid, values in members.items():
            group = torch.stack(values)
            if len(values) == 1:
                stats[uid] = (torch.tensor(0.0), torch.tensor(1.0), 1)
            else:
                stats[uid] = (group.mean(), group.std(), len(values))
        for i in range(scores.shape[0]):
            mean, std, n = stats[index[i]]
            if estimator == "grpo":
                scores[i] = (scores[i] - mean) / (std + EPS)
            elif n > 1:
                scores[i] = scores[i] * n / (n - 1) - mean * n / (n - 1)
        advantages = scores.unsqueeze(-1) * mask
        return advantages

    return run


def verl_reinforce_pp(inputs):
    """veRL (verl/trainer/ppo/core_algos.py, compute_reinforce_plus_plus_outcome_advantage), restated: a
    reverse loop over time with the running return reset after masked tokens, then masked_whiten
    (verl/utils/torch_functional.py) of the returns."""
    rewards, mask = inputs["rewards"], inputs["mask"].to(inputs["rewards"].dtype)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + GAMMA * running
        returns[:, t] = running
        running = running * mask[:, t]
    total = mask.sum()
    mean = (returns * mask).sum() / (total + 1e-8)
    var = (((returns - mean) ** 2) * mask).sum() / (total + 1e-8) * total / (total - 1)
    return (returns - mean) * torch.rsqrt(var + 1e-8) * mask


VERL = {"grpo": verl_grouped("grpo"), "rloo": verl_grouped("rloo"), "reinforce++": verl_reinforce_pp}

COMPAT = {
    "grpo": lambda i: verl_compat.compute_grpo_outcome_advantage(i["rewards"], i["mask"], i["index"])[0],
    "rloo": lambda i: verl_compat.compute_rloo_outcome_advantage(i["rewards"], i["mask"], i["index"])[0],
    "reinforce++": lambda i: verl_compat.compute_reinforce_plus_plus_outcome_advantage(
        i["rewards"], i["mask"], {"gamma": GAMMA}
    )[0],
}


def _estimator(inputs) -> str:
    """The case's estimator, read back from the inputs (a provider sees only them)."""
    return inputs["estimator"]


def eager(inputs):
    """fastrlhf's torch reference: the spec, vectorised."""
    return reference.group_advantages(inputs["scores"], inputs["mask"], _estimator(inputs), GAMMA, EPS)[0]


def providers(device: str) -> list[Provider]:
    return [
        Provider("eager", eager, modes=MODES),
        compiled_provider(eager, device),
        Provider("verl-loop", lambda inputs: VERL[_estimator(inputs)](inputs), modes=MODES),
        Provider("fastrlhf-verl-compat", lambda inputs: COMPAT[_estimator(inputs)](inputs), modes=MODES),
        *(
            Provider(p.name, p.fn, p.reason, modes=MODES)
            for p in kernel_providers(
                device,
                lambda b: (
                    lambda inputs: (
                        group_advantages(
                            inputs["scores"],
                            inputs["mask"],
                            _estimator(inputs),
                            gamma=GAMMA,
                            eps=EPS,
                            backend=b,
                        ).advantages
                    )
                ),
            )
        ),
    ]


def bytes_moved(case, dtype, mode):
    """Read the mask, write the advantages; REINFORCE++ also writes its returns (the scores are
    negligible)."""
    tokens = case.params["batch"] * case.params["k"] * case.params["length"]
    outputs = 2 if case.params["estimator"] == "reinforce++" else 1
    return tokens * (1 + outputs * torch.empty(0, dtype=dtype).element_size())
