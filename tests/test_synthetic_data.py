"""The synthetic world and the bundled sample data: deterministic, readable by the readers, sized as
documented, and ranked by the known preference that ``preference_score`` encodes."""

from __future__ import annotations

import collections
import filecmp
import json
import subprocess
import sys

import pytest

from fastrlhf.data import read_jsonl
from fastrlhf.data import synthetic as world
from fastrlhf.data.hygiene import dedupe_by_prefix


@pytest.fixture(scope="module")
def bundled():
    """The committed sample files, read through the readers."""
    return {kind: read_jsonl(f"{world.SAMPLE_DIR}/{kind}.jsonl", kind) for kind in world.SAMPLE_SIZES}


def test_committed_files_are_what_the_generator_writes(tmp_path):
    first = world.write_sample_data(tmp_path / "a")
    second = world.write_sample_data(tmp_path / "b", seed=0)
    for kind, path in first.items():
        assert filecmp.cmp(path, second[kind], shallow=False), f"{kind}: same seed, different bytes"
        assert filecmp.cmp(path, f"{world.SAMPLE_DIR}/{kind}.jsonl", shallow=False), (
            f"{kind}: the committed file is stale; run `python -m fastrlhf.data.synthetic`"
        )


def test_another_seed_gives_other_data(tmp_path):
    default = world.write_sample_data(tmp_path / "a")
    other = world.write_sample_data(tmp_path / "b", seed=1)
    for kind in world.SAMPLE_SIZES:
        assert not filecmp.cmp(default[kind], other[kind], shallow=False), kind


def test_sizes_and_clean_prompts(bundled):
    for kind, size in world.SAMPLE_SIZES.items():
        assert len(bundled[kind]) == size, kind
    for kind in ("sft", "rm", "ppo"):
        records = bundled[kind]
        # No repeated prompt in a file: the prefix dedupe of the trainers keeps every line.
        assert len(dedupe_by_prefix(records)) == len(records), kind
        assert {world.lookup_task(r.prompt).family for r in records} == set(world.families()), kind
        assert max(len(r.prompt.split()) for r in records) < 15
    texts = [r.text for r in bundled["ptx"]]
    assert len(set(texts)) == len(texts) and max(len(t.split()) for t in texts) < 15


def test_demonstrations_are_the_correct_helpful_answer(bundled):
    for example in bundled["sft"]:
        task = world.lookup_task(example.prompt)
        assert example.response == task.helpful
        assert world.preference_score(example.prompt, example.response) == pytest.approx(1.0)
        assert example.response.endswith(f"{task.answer}.") and len(example.response.split()) < 15


def _check_ranked(records):
    ks, rank1_positions = collections.Counter(), collections.Counter()
    for example in records:
        k = len(example.texts)
        ks[k] += 1
        assert sorted(example.rankings) == list(range(1, k + 1)), example.source
        assert len(set(example.texts)) == k, example.source
        rank1_positions[example.rankings.index(1)] += 1
        by_rank = sorted(zip(example.rankings, example.texts, strict=True))
        scores = [world.preference_score(example.prompt, text) for _, text in by_rank]
        assert scores == sorted(scores, reverse=True) and len(set(scores)) == k, (example.source, by_rank)
    assert set(ks) == {2, 3, 4}
    # Shuffled: the best response is not always in the same place.
    assert set(rank1_positions) == {0, 1, 2, 3}
    return ks


def test_rankings_follow_the_known_preference(bundled):
    _check_ranked(bundled["rm"])


def test_fresh_ranked_data_follows_the_same_preference(tmp_path):
    path = tmp_path / "held_out.jsonl"
    lines = world.ranked_examples(150, seed=7)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    held_out = read_jsonl(path, "rm")
    _check_ranked(held_out)
    assert [r.prompt for r in held_out] != [line["prompt"] for line in world.ranked_examples(150, seed=0)]


def test_users_are_many_and_uneven(bundled):
    for kind in ("sft", "rm", "ppo"):
        counts = collections.Counter(r.user for r in bundled[kind])
        assert None not in counts
        assert 25 <= len(counts) <= world.NUM_USERS, kind
        top, *_, bottom = sorted(counts.values(), reverse=True)
        assert top >= 5 * bottom, (kind, counts)


def test_ppo_extra_field_is_ignored(bundled):
    with open(f"{world.SAMPLE_DIR}/ppo.jsonl", encoding="utf-8") as fh:
        raw = [json.loads(line) for line in fh]
    assert all(set(line) == {"prompt", "family", "user"} for line in raw)
    assert [r.prompt for r in bundled["ppo"]] == [line["prompt"] for line in raw]


@pytest.mark.parametrize(
    "prompt, response, expected",
    [
        ("What is 3 plus 4?", "3 plus 4 is 7.", 1.0),
        ("What is 3 plus 4?", "7", 0.6),
        ("What is 3 plus 4?", "3 plus 4 is 17.", 0.4),  # the right digit at the end is not enough
        ("What is 3 plus 4?", "I do not know.", 0.1),
        ("What is 3 plus 4?", "3 plus 4 is 7. 3 plus 4 is 7.", 0.9),  # padding loses the sentence point
        ("Say hi two times.", "Here is hi two times: hi hi hi.", 0.4),  # one too many is wrong
        ("Write red fox in capitals.", "RED FOX", 0.6),  # the bare answer does not restate the question
        ("Write red fox in capitals.", "Red fox in capitals is Red Fox.", 0.4),
        ("  Which day follows   Sunday? ", "The day after Sunday is Monday.", 1.0),
        ("What number comes after 1?", "The number after 17 is 2.", 0.7),  # "after 17" is not "after 1"
    ],
)
def test_preference_score_rules(prompt, response, expected):
    assert world.preference_score(prompt, response) == pytest.approx(expected)


def test_every_prompt_of_the_world_is_recognised():
    for group in world.families().values():
        for task in group:
            assert world.lookup_task(task.prompt) == task
            assert task.answer not in task.wrong_answers
            assert world.preference_score(task.prompt, task.helpful) == pytest.approx(1.0)
            for wrong in task.wrong_answers:
                assert world.preference_score(task.prompt, f"{task.lead}{wrong}.") == pytest.approx(0.4)
    with pytest.raises(ValueError, match="not a prompt of the synthetic world"):
        world.preference_score("Write me a poem.", "No.")


def test_draws_past_the_pool_repeat_prompts():
    # More prompts than the world has: every prompt is used before any repeats.
    total = sum(len(group) for group in world.families().values())
    drawn = [line["prompt"] for line in world.prompts(total + 10, seed=3)]
    assert len(set(drawn[:total])) == total and len(set(drawn)) == total
    with pytest.raises(ValueError, match="distinct facts"):
        world.pretraining_texts(10_000)


def test_module_entry_point_writes_the_files(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "fastrlhf.data.synthetic", "--out-dir", str(tmp_path), "--seed", "0"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "sft.jsonl" in out.stdout
    for kind in world.SAMPLE_SIZES:
        assert filecmp.cmp(tmp_path / f"{kind}.jsonl", f"{world.SAMPLE_DIR}/{kind}.jsonl", shallow=False)
