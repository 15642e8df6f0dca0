"""training.run_dir belongs to one run at a time.

`claim_run_dir` is called on every rank before anything is built. A fresh start where a run
already is (metrics or checkpoints) is refused unless the user says which they mean: continue
it (`--resume`) or start over (`--training.overwrite true`, which deletes what the trainer
wrote there and nothing else). Rank 0 then holds an exclusive lock on `run_dir/.lock` for the
run's lifetime, so a second trainer on the same directory is refused instead of interleaving
its checkpoints and metrics with the first's. The lock is a `flock`: the kernel drops it when
the holder exits however it exits, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import datetime
import fcntl
import glob
import os
import shutil
import socket
from typing import Optional

from megatron_mgrpo.config.checks import ConfigError

LOCK_FILE = ".lock"
# What a run writes into its directory: `overwrite` removes these and nothing else.
RUN_FILES = ("metrics.jsonl", "config.yaml", "tensorboard", "checkpoints", "*.png")


class RunDirError(ConfigError):
    """The run directory cannot be used as asked (one line, exit code 2)."""


def holds_run(run_dir: str) -> bool:
    """Whether a run has written metrics or checkpoints into `run_dir`."""
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
        return True
    return bool(glob.glob(os.path.join(run_dir, "checkpoints", "step_*")))


class RunDirLock:
    """An exclusive flock on `run_dir/.lock`, naming its holder inside the file."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._fd: Optional[int] = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 512, 0).decode("utf-8", "replace").strip()
            os.close(self._fd)
            self._fd = None
            raise RunDirError(f"training.run_dir {run_dir!r} is in use by another trainer "
                              f"({holder or 'holder unknown'}); wait for it to end or choose "
                              "another --training.run_dir") from None
        started = datetime.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n"
                  .encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "RunDirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim_run_dir(run_dir: str, resume: bool, overwrite: bool, rank: int
                  ) -> Optional[RunDirLock]:
    """Check that a run may start in `run_dir` as asked, clear it for `overwrite`, and (rank 0)
    lock it; returns the lock (None on other ranks). RunDirError with one line otherwise."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunDirError(f"training.run_dir: {run_dir!r} is a file, not a directory")
    if rank != 0:
        if holds_run(run_dir) and not (resume or overwrite):
            raise RunDirError(_refusal(run_dir))
        return None
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"training.run_dir: cannot create {run_dir!r}: {e.strerror}") from None
    lock = RunDirLock(run_dir)  # before looking: the holder of the lock may be writing there
    try:
        if holds_run(run_dir) and not (resume or overwrite):
            raise RunDirError(_refusal(run_dir))
        if overwrite:
            for pattern in RUN_FILES:
                for path in glob.glob(os.path.join(run_dir, pattern)):
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    except BaseException:
        lock.release()
        raise
    return lock


def _refusal(run_dir: str) -> str:
    return (f"training.run_dir {run_dir!r} already holds a run; continue it with --resume, "
            "start over with --training.overwrite true (deletes its metrics and checkpoints), "
            "or choose another --training.run_dir")
