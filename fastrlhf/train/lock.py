"""One run per output directory: an exclusive lock on ``<output>/.lock``, held for the run's lifetime.

Two runs writing into one directory would truncate each other's ``metrics.jsonl`` and delete each other's
partial checkpoint saves. The lock is an ``flock`` on a file holding the owner's PID: the kernel drops it
when the owning process exits, however it exits, so a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from fastrlhf.errors import InputError

LOCK_FILE = ".lock"
# The locks this process holds, by path. A run that raised keeps its TrainingRun (and lock) alive in the
# traceback; a later run of the same process on the same directory (a resume in one Python session, the
# pipeline's stages) takes the lock over instead of locking itself out.
_HELD: dict[Path, RunDirectoryLock] = {}


class RunDirectoryLocked(InputError):
    """Another live process holds the run directory."""


class RunDirectoryLock:
    """``lock = RunDirectoryLock(run_dir)`` takes the lock at once or raises ``RunDirectoryLocked`` naming
    the holder's PID; ``lock.release()`` (or process exit) frees it."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = (Path(run_dir) / LOCK_FILE).resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path in _HELD:
            _HELD.pop(self.path).release()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(self._fd)
            self._fd = None
            raise RunDirectoryLocked(
                f"output: {self.path.parent} is in use by another run (PID {holder}); wait for it to "
                "finish, stop it, or choose another --output"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode("ascii"), 0)
        _HELD[self.path] = self

    def release(self) -> None:
        if _HELD.get(self.path) is self:
            del _HELD[self.path]
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
