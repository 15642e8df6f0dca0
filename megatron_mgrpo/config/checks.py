"""`ConfigError` and the one-line checks every section's `validate()` is written with.

A message is always `section.field: got X; accepted: Y`, so that a bad config never surfaces as a
trace from deep inside megatron-core. This module imports nothing from the package.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NoReturn

__all__ = ["ConfigError", "fail", "positive", "one_of", "all_finite"]


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


def all_finite(value: Any, path: str = "") -> None:
    """Every float anywhere in `value` (a config dataclass, and the mappings and lists inside
    it) is finite: `.inf` and `.nan` are refused naming the field, whatever the field."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            all_finite(getattr(value, f.name), f"{path}.{f.name}" if path else f.name)
    elif isinstance(value, dict):
        for k, v in value.items():
            all_finite(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            all_finite(v, f"{path}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        fail(path, value, "a finite number")
