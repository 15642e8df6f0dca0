"""The errors a run reports to the user as one line (the `mgrpo` command prints them and exits
with their code). A leaf module: the command imports it before anything heavy."""

from __future__ import annotations


class RunStopped(Exception):
    """The run stopped before its last step; the message is one line for the user and
    `exit_code` the process's exit status."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded; the message is one line for the user."""


class RolloutError(RuntimeError):
    """The rollout servers failed: one could not be started or reached, or the servers left
    could not complete a call (no partial batch is returned). Its message is one line, fit to
    print as it is."""
