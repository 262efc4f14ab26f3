"""Atomic, resumable training checkpoints on top of ``accelerate``'s ``save_state``/``load_state``.

A checkpoint is ``run_dir/checkpoint-{step:08d}/``: what ``accelerator.save_state`` writes (prepared
models, optimizers, schedulers, dataloader samplers, registered objects, every process's RNG states)
plus ``trainer_state.json`` (step, epoch, batches consumed, ...), which is written last.

It is built in ``run_dir/.checkpoint-{step:08d}.tmp/``, fsynced, and renamed into place by the main
process, so a crash at any point leaves either a complete checkpoint or a ``.tmp`` directory that
resuming ignores and the next save removes. ``run_dir`` must be one filesystem seen by all processes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from fastrlhf.train.io import atomic_write_text, fsync_dir
from fastrlhf.train.metrics import jsonable

__all__ = [
    "TRAINER_STATE_NAME",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".checkpoint-"


def save_checkpoint(
    accelerator,
    run_dir: str | os.PathLike,
    step: int,
    trainer_state: dict[str, Any],
    keep_last: int = 2,
    modules: dict[str, Any] | None = None,
) -> Path:
    """Save a resumable checkpoint for optimizer step ``step``; returns its directory.

    Every process must call this (``save_state`` is collective under FSDP/DeepSpeed). ``trainer_state``
    must be JSON-serialisable; ``step`` is stored in it. Afterwards only the ``keep_last`` newest
    checkpoints remain. Checkpoints with a step above ``step`` are deleted too: they belong to a run
    that was resumed from an earlier point, and ``latest_checkpoint`` must not return to them.

    ``modules``: ``{name: object}`` saved besides accelerate's state (an EMA of the weights), each by its
    own ``save_checkpoint(path, accelerator)`` (collective) into ``<checkpoint>/<name>`` as tensors
    (safetensors, or torch.distributed.checkpoint when sharded), restored by ``load_checkpoint_modules``;
    unlike accelerate's custom objects (pickles, loaded with ``weights_only=False``), resuming them runs
    no code.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    if accelerator.project_configuration.automatic_checkpoint_naming:
        # accelerate would then ignore our directory and pick its own, defeating the atomic rename.
        raise ValueError("save_checkpoint names checkpoints itself; turn off automatic_checkpoint_naming")
    run_dir = Path(run_dir)
    final = run_dir / f"checkpoint-{step:08d}"
    tmp = run_dir / f"{_TMP_PREFIX}{step:08d}.tmp"
    # Serialise first: a trainer state that is not JSON must fail before anything is written. A NaN
    # metric kept in the state (an evaluation on a diverged model) is stored as null, not refused.
    state = jsonable({**trainer_state, "step": step}, "trainer_state")
    state_text = json.dumps(state, indent=2, allow_nan=False) + "\n"

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        _remove_partial_saves(run_dir)
    accelerator.wait_for_everyone()  # no process may write into tmp while the main one cleans up

    accelerator.save_state(str(tmp))
    for name, module in (modules or {}).items():
        module.save_checkpoint(tmp / name, accelerator)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(tmp / TRAINER_STATE_NAME, state_text)
        _fsync_tree(tmp)
        _move_into_place(tmp, final)
        _prune(run_dir, step, keep_last)
        log.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint_modules(path: str | os.PathLike, modules: dict[str, Any]) -> None:
    """Load the ``{name: object}`` that ``save_checkpoint(modules=...)`` wrote into ``path`` (every
    process)."""
    for name, module in modules.items():
        module.load_checkpoint(Path(path) / name)


def load_checkpoint(accelerator, path: str | os.PathLike) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` saved into the prepared objects; returns the trainer state.

    Call it after ``accelerator.prepare`` (and ``register_for_checkpointing``), with the same objects
    in the same order as when saving.
    """
    path = Path(path)
    state_file = path / TRAINER_STATE_NAME
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint: {TRAINER_STATE_NAME} is missing")
    accelerator.load_state(str(path))
    return json.loads(state_file.read_text(encoding="utf-8"))


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``run_dir`` as ``(step, path)``, oldest step first.

    A directory counts only when it is named ``checkpoint-<step>`` and holds ``trainer_state.json``,
    so ``.tmp`` leftovers and foreign directories are never resumed from.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for entry in run_dir.iterdir():
        match = _CHECKPOINT_RE.match(entry.name)
        if match and (entry / TRAINER_STATE_NAME).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step in ``run_dir``, or None."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def _remove_partial_saves(run_dir: Path) -> None:
    # Left by a crash mid-save (".tmp") or between the two renames of a re-save (".old").
    for entry in run_dir.iterdir():
        if entry.name.startswith(_TMP_PREFIX) and entry.name.endswith((".tmp", ".old")) and entry.is_dir():
            log.info("removing partial checkpoint %s", entry)
            shutil.rmtree(entry)


def _fsync_tree(root: Path) -> None:
    # accelerate writes without fsync; without this a power loss after the rename could leave a
    # checkpoint directory whose files are empty.
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)


def _move_into_place(tmp: Path, final: Path) -> None:
    if final.exists():  # re-saving a step (after a resume): a directory cannot be renamed over a full one
        old = final.with_name(f"{_TMP_PREFIX}{final.name.removeprefix('checkpoint-')}.old")
        os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
        fsync_dir(final.parent)


def _prune(run_dir: Path, step: int, keep_last: int) -> None:
    checkpoints = list_checkpoints(run_dir)
    stale = [path for s, path in checkpoints if s > step]
    current = [path for s, path in checkpoints if s <= step]
    for path in stale + current[:-keep_last]:
        log.info("removing checkpoint %s", path)
        shutil.rmtree(path)
