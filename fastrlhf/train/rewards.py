"""Rule-based rewards: ``--reward-fn module:function``, used instead of or added to the reward model.

The function receives the prompts and the decoded responses of a rollout and returns one float per
response: ``fn(prompts: list[str], responses: list[str]) -> list[float]``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

RewardFn = Callable[[list[str], list[str]], list[float]]


def load_reward_fn(spec: str) -> RewardFn:
    """Import ``module:function``; errors name the spec and what is wrong."""
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise ValueError(f"reward_fn: expected 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"reward_fn: cannot import module {module_name!r} ({error})") from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"reward_fn: {module_name!r} has no callable {function_name!r}")
    return function


def call_reward_fn(function: RewardFn, prompts: list[str], responses: list[str]) -> list[float]:
    """Call ``function`` and check that it returned one finite number per response."""
    values = list(function(list(prompts), list(responses)))
    if len(values) != len(responses):
        raise ValueError(f"reward_fn returned {len(values)} values for {len(responses)} responses")
    rewards = [float(v) for v in values]
    if not all(math.isfinite(r) for r in rewards):
        raise ValueError("reward_fn returned a non-finite reward")
    return rewards
