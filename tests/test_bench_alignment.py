"""``bench/alignment.py``'s reward-model data from the policy's own samples (``--comparisons policy``).

The bench's figures themselves are measured and reported, not tested; this checks the data it trains on:
the hand-written tiers are kept, the policy's samples are ranked by the task's gold function, and no
held-out prompt text is ever sampled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from bench_scripts import load_bench_script

from fastrlhf.data import read_jsonl
from fastrlhf.data.tasks import task_module
from fastrlhf.models.tiny import resolve_model


def _write(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def test_policy_comparisons_keep_the_tiers_rank_by_the_labeler_and_skip_held_out_prompts(
    tmp_path, monkeypatch
):
    from ppo_rewards import digit_fraction

    import fastrlhf.data.tasks as tasks

    # An untrained policy's samples all score 0 by the task's gold function, so nothing would be ranked;
    # the bench asks for the task's labeler by name, and here that name gets one that tells them apart.
    asked = []
    monkeypatch.setattr(
        tasks, "gold_reward_spec", lambda name: asked.append(name) or "ppo_rewards:digit_fraction"
    )
    bench = load_bench_script("alignment")
    task = task_module("format")
    tiers = task.ranked_examples(14, seed=3)
    prompts = list(dict.fromkeys(line["prompt"] for line in tiers))
    held = set(prompts[:3])
    unit = tmp_path / "unit"
    (unit / "data").mkdir(parents=True)
    os.symlink(resolve_model("tiny"), unit / "sft")  # an untrained policy: its samples differ widely
    data = {
        "rm": _write(unit / "data" / "rm.jsonl", tiers),
        "ppo_eval": _write(unit / "data" / "ppo_eval.jsonl", [{"prompt": p} for p in sorted(held)]),
    }
    torch.manual_seed(0)
    merged = bench.label_policy_samples(unit, data, "format", seed=0, max_tokens=8)

    lines = [json.loads(line) for line in Path(merged).read_text(encoding="utf-8").splitlines()]
    assert lines[: len(tiers)] == tiers, "the hand-written tiers come first, unchanged"
    sampled = lines[len(tiers) :]
    assert asked == ["format"]
    assert sampled, "an untrained policy's samples differ in their digits for some prompt"
    assert not {line["prompt"] for line in sampled} & held, "a held-out prompt text was sampled"
    assert len({line["prompt"] for line in sampled}) == len(sampled), "one line per prompt text"
    for line in sampled:
        texts = [r["text"] for r in line["responses"]]
        gold = digit_fraction([line["prompt"]] * len(texts), texts)
        ranks = [r["ranking"] for r in line["responses"]]
        for i in range(len(texts)):
            for j in range(len(texts)):
                assert (gold[i] > gold[j]) == (ranks[i] < ranks[j]), line
    assert len(read_jsonl(merged, "rm")) == len(lines)  # the RM trainer's reader takes the file

    # A finished file is reused, not sampled again.
    before = os.stat(merged).st_mtime_ns
    assert bench.label_policy_samples(unit, data, "format", seed=0, max_tokens=8) == merged
    assert os.stat(merged).st_mtime_ns == before
