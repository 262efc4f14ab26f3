"""SIGTERM and SIGINT stop a training loop cleanly: the step in progress finishes, a checkpoint is written,
and the run exits with ``128 + signal`` and the command that resumes it.

Schedulers (Slurm, Kubernetes) send SIGTERM before they kill a job; without a handler the Python default
ends the process mid-step and everything since the last checkpoint is lost. A second SIGINT while the
first is being honoured interrupts at once (an impatient Ctrl-C twice still works).
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

HANDLED = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(Exception):
    """A signal stopped the run after a checkpoint; ``exit_code`` is ``128 + signum``."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} after step {step}; checkpoint {checkpoint} holds it. Resume with the same "
            "command plus --resume true"
        )


class StopOnSignals:
    """``with StopOnSignals() as stop:`` in the loop, ``if stop.signum is not None:`` checkpoint and raise
    ``RunInterrupted``. The previous handlers come back on exit. Outside the main thread (where Python
    cannot install handlers) it does nothing."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
            log.warning(
                "%s received: finishing this step, then writing a checkpoint and stopping",
                signal.Signals(signum).name,
            )

    def __enter__(self) -> StopOnSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
