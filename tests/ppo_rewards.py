"""Rule rewards for the PPO tests (importable as ``ppo_rewards:<name>`` with tests/ on the path)."""

from __future__ import annotations


def digit_fraction(prompts: list[str], responses: list[str]) -> list[float]:
    """The fraction of a response's characters that are digits: a clear behaviour a random tiny policy
    shows a little of by chance, so PPO has a gradient to follow."""
    return [sum(c.isdigit() for c in r) / max(len(r), 1) for r in responses]


def constant(prompts: list[str], responses: list[str]) -> list[float]:
    return [0.0 for _ in responses]


def nan_for_the_first(prompts: list[str], responses: list[str]) -> list[float]:
    """A broken rule reward: NaN for the first response of every batch."""
    return [float("nan")] + [0.0] * (len(responses) - 1)


def process_rank(prompts: list[str], responses: list[str]) -> list[float]:
    """The launcher's rank of the process that scores: a logged mean over 2 processes is 0.5 only when
    every process's rollout counts, 0.0 when the main process's alone does."""
    import os

    return [float(os.environ.get("RANK", "0")) for _ in responses]
