"""``bench/error_paths.py``: each compiled op's bad-input call by each route, in a child process. On the
CPU every route raises the ValueError naming the argument; a child killed by a signal is reported by
the signal's name, not as a pass."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from bench_scripts import load_bench_script

from fastrlhf.ops import available_backends


@pytest.fixture(scope="module")
def error_paths():
    return load_bench_script("error_paths")


def test_every_route_raises_the_value_error_naming_the_argument(error_paths, monkeypatch, capsys):
    if not available_backends()["cpp"].available:
        pytest.skip(available_backends()["cpp"].reason)
    monkeypatch.setattr(sys, "argv", ["error_paths.py", "--device", "cpu", "--cases", "gather_labels_shape"])
    with pytest.raises(SystemExit) as exit_info:
        error_paths.main()
    out = capsys.readouterr().out
    assert exit_info.value.code == 0, out
    assert out.startswith(f"device: {error_paths.common.device_name('cpu')}; torch ")
    rows = [line for line in out.splitlines() if line.startswith("| gather_labels_shape |")]
    assert [row.split(" | ")[1] for row in rows] == list(error_paths.ROUTES)
    for row in rows:
        assert "raised ValueError: labels has shape (5,), but logits (3, 11)" in row


def test_a_child_killed_by_a_signal_is_named_a_crash(error_paths):
    child = subprocess.run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"])
    assert child.returncode == -signal.SIGSEGV
    assert error_paths.outcome(child.returncode, "") == "crashed (SIGSEGV)"


def test_a_call_that_does_not_raise_is_wrong(error_paths):
    assert error_paths.outcome(3, "no error\n") == "WRONG: no error"
    assert error_paths.outcome(3, "") == "WRONG: exit 3"
    assert error_paths.outcome(0, "ValueError: labels ...\n") == "raised ValueError: labels ..."
