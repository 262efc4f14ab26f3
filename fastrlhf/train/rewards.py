"""Rewards besides the reward model: rule rewards (``--reward-fn module:function``, used instead of or added
to the reward model) and the normalisation of the scores PPO optimises (``--reward-norm``).

A rule reward receives the prompts and the decoded responses of a rollout and returns one float per
response: ``fn(prompts: list[str], responses: list[str]) -> list[float]``. The same signature serves the
ground-truth ("gold") scorer of ``--eval-reward-fn``, which is only ever measured, never trained on.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch

from fastrlhf.errors import InputError

RewardFn = Callable[[list[str], list[str]], list[float]]


def load_reward_fn(spec: str) -> RewardFn:
    """Import ``module:function``; errors name the spec and what is wrong."""
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise InputError(f"reward_fn: expected 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise InputError(f"reward_fn: cannot import module {module_name!r} ({error})") from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise InputError(f"reward_fn: {module_name!r} has no callable {function_name!r}")
    return function


def call_reward_fn(function: RewardFn, prompts: list[str], responses: list[str]) -> list[float]:
    """Call ``function`` and check that it returned one finite number per response."""
    values = list(function(list(prompts), list(responses)))
    if len(values) != len(responses):
        raise InputError(f"reward_fn returned {len(values)} values for {len(responses)} responses")
    rewards = [float(v) for v in values]
    bad = [i for i, r in enumerate(rewards) if not math.isfinite(r)]
    if bad:
        raise InputError(
            f"reward_fn returned a non-finite reward ({rewards[bad[0]]}) for {len(bad)} of {len(rewards)} "
            f"responses, first to prompt {prompts[bad[0]]!r} with response {responses[bad[0]][:200]!r}"
        )
    return rewards


NORMALIZATIONS = ("none", "batch", "running")


class ScoreNormalizer:
    """Scores onto a unit scale before PPO shapes them: ``(s - mean) / std``.

    - ``running``: mean and std of every score seen so far in the run (Welford's update, merged across
      processes by the caller), so a reward model's arbitrary offset and scale stop mattering and β and
      the KL target mean the same thing for any reward model, while one batch's spread does not rescale it.
    - ``batch``: mean and std of this rollout alone.
    - ``none``: the scores as they are.

    ``state()`` / ``load_state()`` carry the running moments through checkpoints (plain floats).
    """

    def __init__(self, kind: str = "running", eps: float = 1e-6):
        if kind not in NORMALIZATIONS:
            raise InputError(f"reward_norm: expected one of {NORMALIZATIONS}, got {kind!r}")
        self.kind, self.eps = kind, eps
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, scores: torch.Tensor) -> None:
        """Merge a batch of scores (all processes' scores, for the same moments everywhere)."""
        values = scores.detach().double().flatten()
        n = values.numel()
        if self.kind != "running" or n == 0:
            return
        batch_mean = float(values.mean())
        batch_m2 = float(((values - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total

    def affine(self, scores: torch.Tensor) -> tuple[float, float]:
        """``(shift, divisor)``: the normalised scores are ``(scores - shift) / divisor``. ``scores``
        (``[N]``) matter only to ``batch``, which takes its moments from them."""
        if self.kind == "none":
            return 0.0, 1.0
        if self.kind == "batch":
            if scores.numel() < 2:
                return float(scores.mean()), 1.0
            return float(scores.mean()), float(scores.std()) + self.eps
        if self.count < 2:
            return self.mean, 1.0
        return self.mean, math.sqrt(self.m2 / (self.count - 1)) + self.eps

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return scores
        shift, divisor = self.affine(scores)
        return (scores - shift) / divisor

    def state(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])
