"""The benchmarks a config may name, and the `START:END` date-window syntax.

A leaf module (the standard library only) so that the config's eval section can check names and
dates without importing the loaders; `benchmarks.BENCHMARKS` has a loader for each name here.
"""

from __future__ import annotations

import datetime
from typing import Optional, Tuple

__all__ = ["BENCHMARK_NAMES", "parse_date_range"]

BENCHMARK_NAMES = ("math500", "aime24", "aime25", "gsm8k", "gpqa", "gpqa_diamond",
                   "livecodebench")


def parse_date_range(text: str) -> Tuple[Optional[datetime.date], Optional[datetime.date]]:
    """`START:END` (ISO dates, either empty) -> (start, end); ValueError if malformed."""
    start, sep, end = text.partition(":")
    if not sep:
        raise ValueError(f"expected START:END, got {text!r}")
    dates = tuple(datetime.date.fromisoformat(x.strip()) if x.strip() else None
                  for x in (start, end))
    return dates  # type: ignore[return-value]
