"""Where a step's time goes: named phases, summed per step, logged as `<phase>_time_s`.

Wall-clock on this rank. Rank 0 generates while the other ranks wait in the broadcast, so on
those ranks `generate_*` is waiting; rank 0's figures are the ones logged.
"""

from __future__ import annotations

import contextlib
import time
from typing import Dict, Iterator

__all__ = ["PhaseTimer"]


class PhaseTimer:
    """`with timer("train"): ...` adds the block's seconds to `train_time_s`."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            key = f"{phase}_time_s"
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0

    def pop(self) -> Dict[str, float]:
        """The phases timed since the last pop, and start over."""
        out, self.seconds = self.seconds, {}
        return out
