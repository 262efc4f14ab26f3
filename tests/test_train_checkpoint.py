"""fastrlhf.train.checkpoint and fastrlhf.train.io: atomic writes, atomic resumable accelerate checkpoints."""

import json
import os
import random

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from fastrlhf.train import io
from fastrlhf.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from fastrlhf.train.io import atomic_output, atomic_write_json, atomic_write_text


@pytest.fixture
def accelerator():
    """A fresh CPU accelerator per test (accelerate keeps process-wide state between instances)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


def prepared_training(accelerator):
    model = nn.Linear(6, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return accelerator.prepare(model, optimizer, scheduler)


def train_steps(model, optimizer, scheduler, n):
    for _ in range(n):
        x = torch.randn(4, 6)  # drawn from the global RNG, which the checkpoint restores
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def snapshot(model, optimizer, scheduler):
    return {
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": {
            i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
            for i, s in optimizer.state_dict()["state"].items()
        },
        "lr": optimizer.param_groups[0]["lr"],
        "scheduler": scheduler.state_dict(),
    }


def assert_same(a, b):
    assert a["weights"].keys() == b["weights"].keys()
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k
    assert a["optimizer"].keys() == b["optimizer"].keys()
    for i in a["optimizer"]:
        for k, v in a["optimizer"][i].items():
            other = b["optimizer"][i][k]
            assert torch.equal(v, other) if torch.is_tensor(v) else v == other, (i, k)
    assert a["lr"] == b["lr"]
    assert a["scheduler"] == b["scheduler"]


def rng_states():
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def test_resume_restores_weights_optimizer_scheduler_and_rng_exactly(accelerator, tmp_path):
    model, optimizer, scheduler = prepared_training(accelerator)
    train_steps(model, optimizer, scheduler, 3)
    path = save_checkpoint(accelerator, tmp_path, step=3, trainer_state={"epoch": 0, "batches_in_epoch": 3})
    saved, saved_rng = snapshot(model, optimizer, scheduler), rng_states()
    train_steps(model, optimizer, scheduler, 2)
    uninterrupted = snapshot(model, optimizer, scheduler)

    train_steps(model, optimizer, scheduler, 4)  # move every piece of state away from the saved one
    assert not torch.equal(model.weight, saved["weights"]["weight"])
    assert optimizer.param_groups[0]["lr"] != saved["lr"]

    state = load_checkpoint(accelerator, path)
    assert state == {"epoch": 0, "batches_in_epoch": 3, "step": 3}
    assert_same(snapshot(model, optimizer, scheduler), saved)
    torch_rng, np_rng, py_rng = rng_states()
    assert torch.equal(torch_rng, saved_rng[0]) and py_rng == saved_rng[2]
    assert all(np.array_equal(a, b) for a, b in zip(np_rng, saved_rng[1], strict=True))

    # the resumed run continues on the very trajectory the uninterrupted one took (same batches drawn)
    train_steps(model, optimizer, scheduler, 2)
    assert_same(snapshot(model, optimizer, scheduler), uninterrupted)

    # and the next random draw after a load is the draw that followed the save
    load_checkpoint(accelerator, path)
    after_load = torch.rand(5)
    torch.set_rng_state(saved_rng[0])
    assert torch.equal(after_load, torch.rand(5))


def test_layout_and_trainer_state_file(accelerator, tmp_path):
    model, optimizer, scheduler = prepared_training(accelerator)
    path = save_checkpoint(accelerator, tmp_path, step=12, trainer_state={"best": 0.5, "step": 999})
    assert path == tmp_path / "checkpoint-00000012"
    assert json.loads((path / "trainer_state.json").read_text()) == {"best": 0.5, "step": 12}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-00000012"]  # no .tmp left
    assert latest_checkpoint(tmp_path) == path


def test_keep_last_prunes_oldest(accelerator, tmp_path):
    model, optimizer, scheduler = prepared_training(accelerator)
    for step in (1, 2, 3, 4):
        save_checkpoint(accelerator, tmp_path, step=step, trainer_state={}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    save_checkpoint(accelerator, tmp_path, step=5, trainer_state={}, keep_last=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5]


def test_resaving_a_step_replaces_it_and_later_steps_are_dropped(accelerator, tmp_path):
    model, optimizer, scheduler = prepared_training(accelerator)
    for step in (2, 4, 6):
        save_checkpoint(accelerator, tmp_path, step=step, trainer_state={"run": "first"}, keep_last=5)
    # resumed from step 2: steps 4 and 6 belong to the abandoned continuation
    save_checkpoint(accelerator, tmp_path, step=4, trainer_state={"run": "second"}, keep_last=5)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]
    assert json.loads((latest_checkpoint(tmp_path) / "trainer_state.json").read_text())["run"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000002", "checkpoint-00000004"]


def test_partial_saves_are_ignored_then_cleaned(accelerator, tmp_path):
    model, optimizer, scheduler = prepared_training(accelerator)
    save_checkpoint(accelerator, tmp_path, step=1, trainer_state={})
    # a crash mid-save of step 2, and a directory that merely looks like a checkpoint
    crashed = tmp_path / ".checkpoint-00000002.tmp"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"partial")
    (crashed / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-00000009").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-00000001"

    save_checkpoint(accelerator, tmp_path, step=2, trainer_state={})
    assert not crashed.exists()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-00000002"
    assert (tmp_path / "checkpoint-00000009").exists()  # not ours: never deleted


def test_no_checkpoint_and_incomplete_checkpoint(accelerator, tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoint-00000003").mkdir()
    with pytest.raises(FileNotFoundError, match="trainer_state.json is missing"):
        load_checkpoint(accelerator, tmp_path / "checkpoint-00000003")


def test_non_json_trainer_state_fails_before_writing(accelerator, tmp_path):
    model, optimizer, scheduler = prepared_training(accelerator)
    with pytest.raises(TypeError, match="trainer_state"):
        save_checkpoint(accelerator, tmp_path, step=1, trainer_state={"sampler": object()})
    assert list(tmp_path.iterdir()) == []


def test_non_finite_numbers_in_the_trainer_state_are_saved_as_null(accelerator, tmp_path):
    """A NaN evaluation (a diverged model, an empty held-out set) must not make the checkpoint fail."""
    model, optimizer, scheduler = prepared_training(accelerator)
    state = {"first_eval": {"perplexity": float("nan"), "loss": float("inf")}, "kl_coef": 0.05}
    directory = save_checkpoint(accelerator, tmp_path, step=3, trainer_state=state)
    loaded = load_checkpoint(accelerator, directory)
    assert loaded["first_eval"] == {"perplexity": None, "loss": None} and loaded["kl_coef"] == 0.05


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert list(tmp_path.iterdir()) == [path]
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~io._UMASK)  # not mkstemp's 0600


def test_atomic_write_keeps_old_file_when_writer_fails_midway(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    atomic_write_text(path, "old: 1\n")

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)  # the new text is in the temp file by now
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(path, "new: 2\n" * 1000)
    assert path.read_text() == "old: 1\n"
    assert list(tmp_path.iterdir()) == [path]


def test_atomic_output_keeps_old_file_when_the_block_raises(tmp_path):
    path = tmp_path / "plot.png"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("renderer crashed")
    assert path.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [path]


def test_atomic_write_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "x.json", {"loss": float("nan")})
    assert list(tmp_path.iterdir()) == []
