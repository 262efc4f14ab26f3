"""Synthetic alignment tasks with a known ("gold") preference, for measuring what RLHF really improves.

Each task is a world of prompts whose demonstrations come from imperfect labelers and whose ranked
comparisons and ``gold_reward`` hold the intended preference. They differ in *what* is rewarded:

| task | what the preference rewards | module |
|---|---|---|
| ``refusal`` | refusing harmful requests, answering harmless ones (the bundled data) | ``...tasks.refusal`` |
| ``concise`` | answering without padding (length) | ``...tasks.concise`` |
| ``format`` | one plain sentence, without labels or brackets | ``...tasks.format`` |
| ``content`` | the correct answer (demonstrations are all correct and plain) | ``fastrlhf.data.synthetic`` |

Every task module has the same functions: ``sft_examples``, ``ranked_examples``, ``prompts``,
``pretraining_texts`` (``(n, seed) -> list[dict]`` in the seed formats) and ``gold_reward(prompts,
responses) -> list[float]`` in [0, 1], whose best response scores 1.0; ``SAMPLE_SIZES`` (file sizes) and
``MAX_NEW_TOKENS`` (a generation budget that fits every demonstration).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from fastrlhf.errors import InputError

TASKS = {
    "refusal": "fastrlhf.data.tasks.refusal",
    "concise": "fastrlhf.data.tasks.concise",
    "format": "fastrlhf.data.tasks.format",
    "content": "fastrlhf.data.synthetic",
}
BUNDLED_TASK = "refusal"  # the world of fastrlhf/data/sample/
BEST_SCORE = 1.0  # the gold score of every task's best response
KINDS = ("sft", "rm", "ppo", "ptx")


def task_module(name: str) -> ModuleType:
    if name not in TASKS:
        raise InputError(f"task: expected one of {', '.join(TASKS)}, got {name!r}")
    return importlib.import_module(TASKS[name])


def gold_reward_spec(name: str) -> str:
    """The ``module:function`` of the task's gold reward, as ``--eval-reward-fn`` takes it."""
    task_module(name)
    return f"{TASKS[name]}:gold_reward"


def write_task_data(
    name: str, out_dir: str | os.PathLike, seed: int = 0, sizes: dict[str, int] | None = None
) -> dict[str, str]:
    """Write the task's ``sft``, ``rm``, ``ppo`` and ``ptx`` JSONL files into ``out_dir`` (atomically each);
    returns their paths by kind. Every seed draws a fresh dataset."""
    from fastrlhf.data.synthetic import write_jsonl

    module = task_module(name)
    sizes = {**module.SAMPLE_SIZES, **(sizes or {})}
    makers = {
        "sft": module.sft_examples,
        "rm": module.ranked_examples,
        "ppo": module.prompts,
        "ptx": module.pretraining_texts,
    }
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for kind in KINDS:
        paths[kind] = os.path.join(os.fspath(out_dir), f"{kind}.jsonl")
        write_jsonl(paths[kind], makers[kind](sizes[kind], seed))
    return paths
