"""``metrics.jsonl`` (one JSON object per logged step) and ``summary.json`` of a run directory.

Each line is ``{"step": int, "time": seconds, <metric>: number, ...}``. A NaN or infinite metric is
written as ``null`` and named in ``"nonfinite": {key: "nan" | "inf" | "-inf"}``, so every line stays
strict JSON (which ``jq``, pandas and browsers all read) and a divergence is still visible.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import operator
import os
import time
from pathlib import Path
from typing import Any

from fastrlhf.train.io import atomic_write_json, atomic_write_text

__all__ = ["METRICS_FILE_NAME", "SUMMARY_FILE_NAME", "MetricsLogger", "read_metrics", "write_summary"]

log = logging.getLogger(__name__)

METRICS_FILE_NAME = "metrics.jsonl"
SUMMARY_FILE_NAME = "summary.json"
_RESERVED = ("step", "time", "nonfinite")


class MetricsLogger:
    """Appends one line per ``log`` call to ``run_dir/metrics.jsonl``, flushed at once.

    ``enabled=False`` (every process but the main one) makes it a no-op that touches no file. A fresh
    run (``resume_from_step=None``) starts the file empty. A resumed run keeps the lines up to and
    including ``resume_from_step`` and drops the rest, which the checkpoint never saw and the resumed
    run will log again; ``time`` then continues from the last kept line.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, resume_from_step: int | None = None):
        self.path = Path(run_dir) / METRICS_FILE_NAME
        self.enabled = enabled
        self._file = None
        self._time_offset = 0.0
        self._start = time.perf_counter()
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from_step is None:
            if self.path.exists() and self.path.stat().st_size > 0:
                log.warning("starting %s afresh; its previous contents are discarded", self.path)
            kept = []
        else:
            records = read_metrics(self.path) if self.path.exists() else []
            kept = [r for r in records if r["step"] <= resume_from_step]
            if len(kept) < len(records):
                log.info(
                    "dropped %d metric lines after step %d from %s",
                    len(records) - len(kept),
                    resume_from_step,
                    self.path,
                )
            if kept:
                self._time_offset = float(kept[-1]["time"])
        atomic_write_text(self.path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open across log calls

    def log(self, step: int, /, **metrics: Any) -> None:
        """Append ``{"step", "time", **metrics}``; values are numbers, or one-element tensors/arrays."""
        if not self.enabled:
            return
        if self._file is None:
            raise ValueError(f"{self.path}: log() after close()")
        record: dict[str, Any] = {
            "step": operator.index(step),
            "time": round(self._time_offset + time.perf_counter() - self._start, 3),
        }
        nonfinite = {}
        for key, value in metrics.items():
            if key in _RESERVED:
                raise ValueError(f"metric name {key!r} is reserved for the line's own fields {_RESERVED}")
            number = _to_number(f"metric {key!r}", value)
            if isinstance(number, float) and not math.isfinite(number):
                nonfinite[key] = "nan" if math.isnan(number) else ("inf" if number > 0 else "-inf")
                number = None
            record[key] = number
        if nonfinite:
            record["nonfinite"] = nonfinite
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()  # a crash or a reader (tail -f, the plots) sees every finished line

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All lines of a ``metrics.jsonl`` as dicts, in file order.

    A last line that does not parse is what a crash mid-write leaves: it is skipped with a warning.
    A bad line anywhere else is corruption and raises ValueError naming the file and line.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not an object with an integer 'step'")
        except ValueError as err:
            if number == len(lines):
                log.warning("%s:%d: skipping an incomplete last line (%s)", path, number, err)
                break
            raise ValueError(f"{path}:{number}: bad metrics line: {err}") from None
        records.append(record)
    return records


def write_summary(run_dir: str | os.PathLike, summary: dict[str, Any]) -> Path:
    """Write ``run_dir/summary.json`` atomically; returns its path.

    Tensors and numpy scalars become numbers, paths become strings, and NaN/infinity become null.
    """
    return atomic_write_json(Path(run_dir) / SUMMARY_FILE_NAME, jsonable(summary, "summary"))


def _to_number(what: str, value: Any) -> int | float:
    if isinstance(value, numbers.Real):  # int, float, bool and numpy's real scalars
        return value if isinstance(value, int) else float(value)
    if hasattr(value, "item"):  # torch tensors and numpy arrays: one element only
        size = value.numel() if hasattr(value, "numel") else getattr(value, "size", 1)
        if size != 1:
            raise ValueError(f"{what}: expected one value, got {size} (reduce it first)")
        return float(value.item())
    raise TypeError(f"{what}: expected a number, got {type(value).__name__}")


def jsonable(obj: Any, where: str) -> Any:
    """``obj`` as plain JSON values: tensors and numpy scalars as numbers, paths as strings, NaN and
    infinities as null (``where`` names the value in errors)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, str | bool | int):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    number = _to_number(where, obj)
    return number if math.isfinite(number) else None


def global_metrics(accelerator, metrics: dict[str, Any], maximum=(), total=()) -> dict[str, Any]:
    """Per-process scalar ``metrics`` made global: the mean over the processes (their rollouts are the
    same size), except the keys in ``maximum`` (the largest) and in ``total`` (the sum: a per-process
    throughput). None stays None. Collective: every process must call it with the same keys, in one
    ``gather``; one process is returned as is."""
    if accelerator.num_processes == 1:
        return metrics
    import torch

    keys = [key for key, value in metrics.items() if value is not None]
    mine = torch.tensor([float(metrics[key]) for key in keys], dtype=torch.float64, device=accelerator.device)
    every = accelerator.gather(mine[None]).reshape(accelerator.num_processes, len(keys)).cpu()
    merged = dict(metrics)
    for column, key in enumerate(keys):
        values = every[:, column]
        reduced = values.max() if key in maximum else values.sum() if key in total else values.mean()
        merged[key] = float(reduced)
    return merged
