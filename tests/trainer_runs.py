"""Helpers for tests that run the trainers in-process on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps process-wide state; every in-process run starts from a clean one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def without_plots(flags: dict) -> dict:
    """``flags`` with ``plots=False`` unless the test set it: the PNG plots cost 1-3 s a run (matplotlib's
    import and a dozen figures), and tests/test_trainers.py and test_train_metrics.py check them."""
    return {"plots": False, **flags}


def run_sft(output: Path, **flags):
    from accelerate.state import AcceleratorState

    from fastrlhf.train.config import parse_config
    from fastrlhf.train.sft import SFTConfig, train_sft

    AcceleratorState._reset_state(reset_partial_state=True)
    return train_sft(
        parse_config(SFTConfig, to_argv(output=str(output), **without_plots(flags)), prog="test")
    )


def run_rm(output: Path, **flags):
    from accelerate.state import AcceleratorState

    from fastrlhf.train.config import parse_config
    from fastrlhf.train.rm import RMConfig, train_rm

    AcceleratorState._reset_state(reset_partial_state=True)
    return train_rm(parse_config(RMConfig, to_argv(output=str(output), **without_plots(flags)), prog="test"))


def run_ppo(output: Path, **flags):
    from accelerate.state import AcceleratorState

    from fastrlhf.train.config import parse_config
    from fastrlhf.train.ppo import PPOConfig, train_ppo

    AcceleratorState._reset_state(reset_partial_state=True)
    return train_ppo(
        parse_config(PPOConfig, to_argv(output=str(output), **without_plots(flags)), prog="test")
    )


def crash_after_checkpoint(monkeypatch, at_step: int) -> None:
    """Make the next run raise KeyboardInterrupt right after its checkpoint of step ``at_step`` is on disk
    (a simulated interruption); undo with ``monkeypatch.undo()``."""
    from fastrlhf.train.run import TrainingRun

    original = TrainingRun.checkpoint

    def checkpoint_then_crash(self, step, state, *args, **kwargs):
        original(self, step, state, *args, **kwargs)
        if step == at_step:
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(TrainingRun, "checkpoint", checkpoint_then_crash)


def interrupted_copy(run_dir: Path, step: int, into: Path) -> Path:
    """``into`` as ``run_dir`` stood when interrupted right after its step-``step`` checkpoint: that
    checkpoint, the config and the metrics (a resumed run drops the rows past its checkpoint)."""
    import shutil

    name = f"checkpoint-{step:08d}"
    into.mkdir(parents=True)
    shutil.copytree(Path(run_dir) / name, into / name)
    for file in ("config.yaml", "metrics.jsonl"):
        shutil.copy(Path(run_dir) / file, into / file)
    return into


# The launcher configs the docs ship, as a user passes them to `accelerate launch --config_file`.
ACCELERATE_CONFIGS = Path(__file__).resolve().parent.parent / "examples" / "accelerate"


def launch_two_processes(command: str, output: Path, config_file: Path | None = None, **flags) -> dict:
    """``accelerate launch --multi_gpu --num_processes 2 -m fastrlhf.cli <command> --output <output> ...``
    (or ``--config_file config_file``, a 2-process config) with no GPU visible (accelerate then forms a
    gloo group on CPU); asserts it succeeded and returns the run's summary. tests/ joins PYTHONPATH so
    that rule rewards such as ``ppo_rewards:...`` import."""
    import os
    import subprocess
    import sys

    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file is not None:
        launch += ["--config_file", str(config_file)]
    else:
        launch += ["--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
        launch += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    argv = launch + ["-m", "fastrlhf.cli", command] + to_argv(output=str(output), **without_plots(flags))
    tests_dir = str(Path(__file__).parent)
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((Path(output) / "summary.json").read_text())


def train_losses(run_dir: Path) -> dict[int, float]:
    """``{step: train/loss}`` of a run's metrics."""
    rows = read_lines(Path(run_dir) / "metrics.jsonl")
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


def final_weights_difference(a_dir: Path, b_dir: Path) -> float:
    """The largest absolute difference between two runs' final models (``<run>/model``), in float64."""
    from safetensors.torch import load_file

    a = load_file(str(Path(a_dir) / "model" / "model.safetensors"))
    b = load_file(str(Path(b_dir) / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def to_argv(**flags) -> list[str]:
    argv = []
    for name, value in flags.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
