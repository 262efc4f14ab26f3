"""The measuring parts of ``bench/vs_trl_ppo.py`` (the side-by-side against TRL's PPOTrainer): a child's peak
RSS, step times from a run's metrics, the CLI arguments. The comparison itself needs TRL's own venv and
minutes of an idle machine; it is run by hand and its figures reported, not tested."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import vs_trl_ppo  # noqa: E402


def test_run_measured_reports_the_childs_own_peak_rss():
    grow = "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.2)"
    peak, wall = vs_trl_ppo.run_measured([sys.executable, "-c", grow], timeout=60)
    assert 300 * 2**20 < peak < 400 * 2**20, peak / 2**20
    assert wall > 0.2
    small, _ = vs_trl_ppo.run_measured([sys.executable, "-c", "pass"], timeout=60)
    assert small < 100 * 2**20, "a later child is measured alone, not with the earlier one's peak"


def test_run_measured_raises_with_the_childs_output():
    failing = [sys.executable, "-c", "import sys; print('the reason'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match=r"(?s)exit 3.*the reason"):
        vs_trl_ppo.run_measured(failing, timeout=60)
    with pytest.raises(RuntimeError, match="timed out"):
        vs_trl_ppo.run_measured([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)


def test_step_times_come_from_the_training_lines_after_the_warmup(tmp_path):
    lines = [
        {"step": 0, "time": 0.1, "eval/perplexity": 9.0},
        {"step": 1, "time": 3.0, "policy/loss": 0.1},
        {"step": 2, "time": 5.5, "policy/loss": 0.2},
        {"step": 3, "time": 7.5, "policy/loss": 0.3},
        {"step": 4, "time": 9.0, "policy/loss": 0.4},
        {"step": 4, "time": 9.9, "eval/perplexity": 8.0},
    ]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    ends = vs_trl_ppo.fastrlhf_step_ends(str(metrics))
    assert ends == [3.0, 5.5, 7.5, 9.0]
    assert vs_trl_ppo.step_durations(ends, warmup=1) == pytest.approx([2.5, 2.0, 1.5])
    assert vs_trl_ppo.step_durations(ends, warmup=2) == pytest.approx([2.0, 1.5])


def test_arguments_are_checked():
    args = vs_trl_ppo.parse_args(["--modes", "separate,lora", "--steps", "3"])
    assert args.modes == ["separate", "lora"] and args.steps == 3
    for bad in (["--modes", "separate,bogus"], ["--modes", ""], ["--steps", "0"], ["--warmup", "0"]):
        with pytest.raises(SystemExit):
            vs_trl_ppo.parse_args(bad)
