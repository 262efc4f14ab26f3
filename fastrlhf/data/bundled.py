"""The sample data that ships with the package, addressable as ``--data sample``."""

from __future__ import annotations

from pathlib import Path

from fastrlhf.data.synthetic import SAMPLE_DIR
from fastrlhf.errors import InputError

SAMPLE_FILES = {"sft": "sft.jsonl", "rm": "rm.jsonl", "ppo": "ppo.jsonl", "ptx": "ptx.jsonl"}


def data_path(value: str, kind: str, argument: str = "data") -> Path:
    """``value`` as a path; ``sample`` names the bundled file of ``kind``. Missing files raise ValueError."""
    if value == "sample":
        if kind not in SAMPLE_FILES:
            raise InputError(f"{argument}: there is no bundled sample for kind {kind!r}")
        return Path(SAMPLE_DIR) / SAMPLE_FILES[kind]
    path = Path(value)
    if not path.is_file():
        raise InputError(
            f"{argument}: {value!r} is not a file (pass a JSONL path, or 'sample' for the bundled data)"
        )
    return path
