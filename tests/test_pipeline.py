"""``fastrlhf pipeline``: SFT -> RM -> PPO and PPO-ptx into one directory, with the summary table."""

from __future__ import annotations

import json

from accelerate.state import AcceleratorState

from fastrlhf.cli import main
from fastrlhf.train.pipeline import PipelineConfig, run_pipeline, summary_table


def test_pipeline_runs_every_stage_and_reuses_finished_ones(tmp_path, capsys):
    AcceleratorState._reset_state(reset_partial_state=True)
    output = tmp_path / "pipeline"
    argv = ["pipeline", "--output", str(output), "--sft-epochs", "2", "--ppo-steps", "3"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    for stage in ("sft", "rm", "ppo", "ppo-ptx"):
        assert (output / stage / "model" / "config.json").is_file(), stage
        assert (output / stage / "summary.json").is_file(), stage
    summary = json.loads((output / "summary.json").read_text())
    assert summary["sft"]["eval_loss_end"] < summary["sft"]["eval_loss_start"]
    assert 0.0 <= summary["rm"]["eval_accuracy_end"] <= 1.0
    for name in ("ppo", "ppo-ptx"):
        part = summary[name]
        # The bundled prompts are scored by the bundled world's known preference.
        assert part["eval_sampled_gold_start"] is not None
        assert part["eval_sampled_judge"] == "gold"
        assert 0.0 <= part["eval_sampled_win_rate"] <= 1.0
        assert part["gap_closed"] is not None
        assert part["eval_perplexity_start"] > 0 and part["eval_perplexity_end"] > 0
        # Three steps moved the policy off the SFT policy it started as, on the held-out text too.
        assert part["eval_text_kl_start"] == 0.0 and part["eval_text_kl_end"] > 0
    # The same numbers in the printed table and in summary.md.
    assert (output / "summary.md").read_text().strip() == summary_table(summary).strip()
    assert "| RM | held-out pairwise accuracy |" in table and "PPO-PTX" in table
    assert "share of the SFT -> best gold gap closed" in table
    assert "| PPO | held-out text: KL to the SFT policy (nats/token) | 0 |" in table
    assert (output / "pipeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # PPO-ptx pulls the held-out text's perplexity below plain PPO's (its LM loss is on that text's source).
    assert summary["ppo-ptx"]["eval_perplexity_end"] < summary["ppo"]["eval_perplexity_end"]

    # A second call finds every stage finished and only rebuilds the table.
    stamps = {p: p.stat().st_mtime_ns for p in output.glob("*/summary.json")}
    again = run_pipeline(PipelineConfig(output=str(output), sft_epochs=2, ppo_steps=3))
    assert {p: p.stat().st_mtime_ns for p in output.glob("*/summary.json")} == stamps
    assert again == summary


def test_the_optimizer_reaches_every_stage(tmp_path, monkeypatch):
    """``--optimizer`` is every stage's: SFT, RM and both PPO runs get it, and a wrong name is refused
    before any stage starts."""
    import pytest

    from fastrlhf.errors import InputError
    from fastrlhf.train import pipeline

    stages = []

    def record(directory, train, config_cls, prog, **flags):
        stages.append((directory.name, flags.get("optimizer")))
        return {}  # no training: what each stage is handed is under test (the table shows n/a)

    monkeypatch.setattr(pipeline, "run_stage", record)
    run_pipeline(PipelineConfig(output=str(tmp_path / "run"), optimizer="adamw8bit"))
    assert stages == [(name, "adamw8bit") for name in ("sft", "rm", "ppo", "ppo-ptx")]
    with pytest.raises(InputError, match=r"optimizer: expected one of .*'adam'"):
        PipelineConfig(output=str(tmp_path / "run"), optimizer="adam")
