"""Run ``fastrlhf <command> ...`` in this process and send it a real SIGTERM when the run logs step N.

``python tests/signal_runner.py N <command> <flags...>``; N = 0 sends nothing. The signal goes through the
kernel to this process's handler like one from a scheduler, only at a step chosen in advance, so a test
interrupts mid-run deterministically. Exits with the CLI's exit code.
"""

from __future__ import annotations

import os
import signal
import sys

from fastrlhf.cli import main
from fastrlhf.train.run import TrainingRun

if __name__ == "__main__":
    kill_at = int(sys.argv[1])
    original = TrainingRun.log

    def log_then_signal(self, step, metrics, bar=()):
        original(self, step, metrics, bar)
        if kill_at and step == kill_at and any(k.startswith(("train/", "score/")) for k in metrics):
            os.kill(os.getpid(), signal.SIGTERM)

    TrainingRun.log = log_then_signal
    sys.exit(main(sys.argv[2:]))
