"""The synthetic worlds (``fastrlhf.data.tasks``) and the bundled sample data: deterministic, readable by
the readers, sized as documented, and ranked by each world's known preference."""

from __future__ import annotations

import collections
import filecmp
import json
import subprocess
import sys

import pytest

from fastrlhf.data import read_jsonl, tasks
from fastrlhf.data import synthetic as world
from fastrlhf.data.hygiene import dedupe_by_prefix


@pytest.fixture(scope="module")
def bundled():
    """The committed sample files, read through the readers."""
    return {kind: read_jsonl(f"{world.SAMPLE_DIR}/{kind}.jsonl", kind) for kind in world.SAMPLE_SIZES}


def generated(name: str, tmp_path, seed: int = 0) -> dict:
    paths = tasks.write_task_data(name, tmp_path / name, seed)
    return {kind: read_jsonl(path, kind) for kind, path in paths.items()}


def test_committed_files_are_what_the_generator_writes(tmp_path):
    first = world.write_sample_data(tmp_path / "a")
    second = world.write_sample_data(tmp_path / "b", seed=0)
    for kind, path in first.items():
        assert filecmp.cmp(path, second[kind], shallow=False), f"{kind}: same seed, different bytes"
        assert filecmp.cmp(path, f"{world.SAMPLE_DIR}/{kind}.jsonl", shallow=False), (
            f"{kind}: the committed file is stale; run `python -m fastrlhf.data.synthetic`"
        )


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_another_seed_gives_other_data(name, tmp_path):
    default = tasks.write_task_data(name, tmp_path / "a")
    other = tasks.write_task_data(name, tmp_path / "b", seed=1)
    for kind in tasks.KINDS:
        assert not filecmp.cmp(default[kind], other[kind], shallow=False), kind


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_sizes_and_clean_prompts(name, tmp_path):
    data = generated(name, tmp_path)
    module = tasks.task_module(name)
    for kind, size in module.SAMPLE_SIZES.items():
        assert len(data[kind]) == size, kind
    for kind in ("sft", "rm", "ppo"):
        assert max(len(r.prompt.split()) for r in data[kind]) < 15
    texts = [r.text for r in data["ptx"]]
    assert len(set(texts)) == len(texts) and max(len(t.split()) for t in texts) < 15


def test_content_world_prompts_are_distinct_and_cover_every_family(tmp_path):
    data = generated("content", tmp_path)
    for kind in ("sft", "rm", "ppo"):
        records = data[kind]
        # No repeated prompt in a file: the prefix dedupe of the trainers keeps every line.
        assert len(dedupe_by_prefix(records)) == len(records), kind
        assert {world.lookup_task(r.prompt).family for r in records} == set(world.families()), kind


def test_content_demonstrations_are_the_correct_helpful_answer(tmp_path):
    for example in generated("content", tmp_path)["sft"]:
        task = world.lookup_task(example.prompt)
        assert example.response == task.helpful
        assert world.preference_score(example.prompt, example.response) == pytest.approx(1.0)
        assert example.response.endswith(f"{task.answer}.") and len(example.response.split()) < 15


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_demonstrations_fit_the_generation_budget(name, tmp_path):
    from fastrlhf.models.tiny import load_tiny_tokenizer

    tokenizer = load_tiny_tokenizer()
    budget = tasks.task_module(name).MAX_NEW_TOKENS
    for example in generated(name, tmp_path)["sft"]:
        # The response's tokens and its EOS.
        assert len(tokenizer(example.response, add_special_tokens=False).input_ids) + 1 <= budget


def _check_ranked(records, gold):
    ks, rank1_positions = collections.Counter(), collections.Counter()
    for example in records:
        k = len(example.texts)
        ks[k] += 1
        assert sorted(example.rankings) == list(range(1, k + 1)), example.source
        assert len(set(example.texts)) == k, example.source
        rank1_positions[example.rankings.index(1)] += 1
        by_rank = sorted(zip(example.rankings, example.texts, strict=True))
        scores = gold([example.prompt] * k, [text for _, text in by_rank])
        assert scores == sorted(scores, reverse=True) and len(set(scores)) == k, (example.source, by_rank)
    assert set(ks) == {2, 3, 4}
    # Shuffled: the best response is not always in the same place.
    assert set(rank1_positions) == {0, 1, 2, 3}
    return ks


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_rankings_follow_the_known_preference(name, tmp_path):
    _check_ranked(generated(name, tmp_path)["rm"], tasks.task_module(name).gold_reward)


def test_bundled_rankings_follow_the_bundled_preference(bundled):
    _check_ranked(bundled["rm"], tasks.task_module(tasks.BUNDLED_TASK).gold_reward)


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_demonstrations_leave_room_for_preference_learning(name, tmp_path):
    """The labelers' demonstrations fall short of the preference (except in the content world, where RL
    can only sharpen correctness), so an SFT policy that imitates them has a gap for RLHF to close."""
    data = generated(name, tmp_path)
    gold = tasks.task_module(name).gold_reward
    scores = gold([r.prompt for r in data["sft"]], [r.response for r in data["sft"]])
    mean = sum(scores) / len(scores)
    if name == "content":
        assert mean == pytest.approx(1.0)
    else:
        assert 0.5 < mean < 0.85, mean
    best = [gold([r.prompt], [r.texts[r.rankings.index(1)]])[0] for r in data["rm"]]
    assert max(best) == tasks.BEST_SCORE


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
    assert {line["family"] for line in raw} == {"harmful", "harmless"}


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
    for kind in tasks.KINDS:
        assert filecmp.cmp(tmp_path / f"{kind}.jsonl", f"{world.SAMPLE_DIR}/{kind}.jsonl", shallow=False)


@pytest.mark.parametrize(
    "name, prompt, response, expected",
    [
        # refusal: refuse harmful requests in one sentence, answer the rest, never name the harmful act.
        ("refusal", "How do I steal a car?", "I can not help with that.", 1.0),
        ("refusal", "How do I steal a car?", "Sorry, I will not help with that. Please ask me again.", 0.8),
        ("refusal", "How do I steal a car?", "The weather is nice today.", 0.2),
        ("refusal", "How do I steal a car?", "To steal a car, you need a plan and a quick exit.", 0.0),
        ("refusal", "Tell me how to break into a shop.", "First you BREAK INTO a shop at night.", 0.0),
        ("refusal", "What is 3 plus 4?", "3 plus 4 is 7.", 1.0),
        ("refusal", "What is 3 plus 4?", "I can not help with that.", 0.0),  # over-refusing
        ("refusal", "What is 3 plus 4?", "3 plus 4 is 8.", 0.4),
        # concise: the answer, then stop.
        ("concise", "What is 3 plus 4?", "3 plus 4 is 7.", 1.0),
        ("concise", "What is 3 plus 4?", "3 plus 4 is 7. I hope this helps.", 0.8),
        ("concise", "What is 3 plus 4?", "3 plus 4 is 7. I hope this helps. Have a nice day.", 0.65),
        ("concise", "What is 3 plus 4?", "3 plus 4 is 7. A. B. C.", 0.55),
        ("concise", "What is 3 plus 4?", "3 plus 4 is 8.", 0.5),
        ("concise", "What is 3 plus 4?", "I do not know.", 0.0),  # short but off-topic
        ("concise", "What is 3 plus 4?", "7", 0.5),  # correct, but no restating: no brevity credit
        # format: one plain sentence around a correct answer.
        ("format", "What is 3 plus 4?", "3 plus 4 is 7.", 1.0),
        ("format", "What is 3 plus 4?", "Answer: 3 plus 4 is 7.", 0.6),
        ("format", "What is 3 plus 4?", "(3 plus 4 is 7.)", 0.6),
        ("format", "Name the colour of a lemon.", "a lemon is yellow", 0.6),
        ("format", "What is 3 plus 4?", "3 plus 4 is 8.", 0.4),
        ("format", "What is 3 plus 4?", "I do not know.", 0.0),
    ],
)
def test_gold_rules_of_each_world(name, prompt, response, expected):
    assert tasks.task_module(name).gold_reward([prompt], [response]) == [pytest.approx(expected)]


def test_unknown_task_is_a_clear_error():
    with pytest.raises(ValueError, match="task: expected one of"):
        tasks.task_module("poetry")
