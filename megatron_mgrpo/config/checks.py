"""`ConfigError` and the one-line checks every section's `validate()` is written with.

A message is always `section.field: got X; accepted: Y`, so that a bad config never surfaces as a
trace from deep inside megatron-core. This module imports nothing from the package.
"""

from __future__ import annotations

from typing import Any, NoReturn

__all__ = ["ConfigError", "fail", "positive", "one_of"]


class ConfigError(ValueError):
    """A config value is wrong; the message names the field and what it accepts."""


def fail(path: str, value: Any, accepted: str) -> NoReturn:
    raise ConfigError(f"{path}: got {value!r}; accepted: {accepted}")


def positive(path: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        fail(path, value, "an integer >= 1")


def one_of(path: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        fail(path, value, " | ".join(choices))
