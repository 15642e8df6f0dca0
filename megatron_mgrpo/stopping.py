"""Stopping a run on request: SIGINT (Ctrl-C), SIGTERM (schedulers, `kill`) or a stop file.

While the models are being built a signal stops at once (`Interrupted`, so every resource
built so far is closed on the way out). Once steps run, the first signal asks for a stop: the
current step finishes, a checkpoint is saved and the run exits saying how to resume. A second
signal stops at once, saving nothing (the newest checkpoint is the one to resume from).

Under torchrun every rank gets the signal; rank 0's view is broadcast, so all ranks stop after
the same step. (torchrun's agent kills its workers 30 s after forwarding a signal: a save that
takes longer is better asked for with training.stop_file, which the slurm launchers use.)
"""

from __future__ import annotations

import os
import signal
from typing import Optional

from megatron_mgrpo.errors import RunStopped

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(RunStopped):
    """A signal stopped the run where it could not finish a step (exit code 128 + signal)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message, exit_code(signum))
        self.signum = signum


class StopRequests:
    """Catches SIGINT and SIGTERM for the run's lifetime (a context manager, main thread)."""

    def __init__(self, stop_file: Optional[str] = None):
        self.stop_file = stop_file
        self.signum: Optional[int] = None
        self.phase = "starting"  # -> "stepping" -> "finishing", set by the trainer
        self.saved_step: Optional[int] = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.phase == "starting":
            raise Interrupted(signum, f"{name} while starting up: stopped, nothing was saved")
        if self.phase == "finishing":
            raise Interrupted(signum, f"{name} after the last step: stopped while finishing "
                                      "(the steps are done and saved)")
        if self.signum is not None:
            newest = f"step {self.saved_step}" if self.saved_step else "none yet"
            raise Interrupted(signum, f"second {name}: stopped at once without saving "
                                      f"(newest checkpoint: {newest})")
        self.signum = signum
        # os.write, not print: a handler that prints while the interrupted code prints fails
        # with a reentrant-call error.
        os.write(2, f"\n{name}: stopping after this step (a checkpoint is saved; send it "
                    "again to stop at once without saving)\n".encode())

    def reason(self) -> Optional[str]:
        """Why this rank wants to stop (a signal's name, or the stop file), or None."""
        if self.signum is not None:
            return signal.Signals(self.signum).name
        if self.stop_file and os.path.exists(self.stop_file):
            return f"stop file {self.stop_file}"
        return None

    def __enter__(self) -> "StopRequests":
        if _main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def exit_code(signum: int) -> int:
    return 128 + signum

