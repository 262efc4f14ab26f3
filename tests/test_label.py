"""``fastrlhf label``: K samples per prompt from a policy, ranked by a labeler into the RM format."""

from __future__ import annotations

import json

import torch

from fastrlhf.cli import main
from fastrlhf.data import read_jsonl


def test_label_writes_rankings_that_follow_the_labeler(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Say something about {i}.", "user": f"u{i % 3}"} for i in range(12)]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "ranked.jsonl"
    argv = ["label", "--prompts", str(prompts), "--labeler", "ppo_rewards:digit_fraction"]
    argv += ["--output", str(output), "--samples-per-prompt", "5", "--max-new-tokens", "12"]
    argv += ["--temperature", "1.5"]
    assert main(argv) == 0
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert lines, "the untrained tiny model's samples differ, so some prompts must be ranked"
    records = read_jsonl(output, "rm")  # the RM trainer's reader accepts the file
    from ppo_rewards import digit_fraction

    for line, record in zip(lines, records, strict=True):
        texts = [r["text"] for r in line["responses"]]
        assert len(set(texts)) == len(texts) and 2 <= len(texts) <= 5
        scores = digit_fraction([line["prompt"]] * len(texts), texts)
        ranks = [r["ranking"] for r in line["responses"]]
        for i in range(len(texts)):
            for j in range(len(texts)):
                if scores[i] > scores[j]:
                    assert ranks[i] < ranks[j], line
                if scores[i] == scores[j]:
                    assert ranks[i] == ranks[j], line
        assert record.user == rows[[r["prompt"] for r in rows].index(line["prompt"])]["user"]


def test_prompts_whose_samples_score_alike_are_left_out():
    from fastrlhf.inference.label import label_comparisons
    from fastrlhf.models.loading import ModelOptions, load_causal_lm, load_tokenizer
    from fastrlhf.models.tiny import resolve_model

    path = resolve_model("tiny")
    tokenizer, lm = load_tokenizer(path), load_causal_lm(path, ModelOptions())
    ids = [tuple(tokenizer("Hello there.").input_ids)] * 3
    torch.manual_seed(0)
    alike = lambda prompts, responses: [1.0] * len(responses)  # noqa: E731
    lines, report = label_comparisons(
        lm, tokenizer, ids, ["a", "b", "c"], alike, samples_per_prompt=3, max_new_tokens=4
    )
    assert lines == [] and report.lines == 0 and report.prompts == 3


def test_label_needs_a_labeler_and_two_samples(tmp_path, capsys):
    assert main(["label", "--output", str(tmp_path / "x.jsonl")]) == 2
    assert "labeler" in capsys.readouterr().err
    argv = ["label", "--output", str(tmp_path / "x.jsonl"), "--labeler", "ppo_rewards:constant"]
    assert main([*argv, "--samples-per-prompt", "1"]) == 2
    assert "samples_per_prompt" in capsys.readouterr().err
