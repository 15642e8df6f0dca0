"""Collapse alarms and the collapse step, read off the rows a run logs (the diagnostics section).

The per-step figures come from `algorithm.diagnostics` (through `update.score_groups` and
`update.plan_update`) and the validation accuracy from `evaluation.periodic.Validator`; this
module only keeps what needs memory across steps: the best validation point, the current run of
points below it, and which alarms are already firing (each says so once, when it starts).
Its state goes into every checkpoint, so a resumed run flags the same steps as an uninterrupted
one.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from megatron_mgrpo.config.schema import DiagnosticsConfig

# (metric the floor applies to, the diagnostics field holding the floor)
FLOORS = (("pseudo_label_acc", "min_pseudo_label_accuracy"),
          ("entropy_mean", "min_entropy"),
          ("distinct_answers", "min_distinct_answers"))


class CollapseTracker:
    """The collapse step over validation points, judged online against the best so far.

    The collapse step is the step of the first validation point after the best one such that
    this point and the `window - 1` after it all lie strictly below best - `margin`. A point
    above the best is the new best and starts over; a point at or above best - margin breaks
    the run (a recovery inside the window: no collapse). Ties with the best keep the earlier
    best. The step is found once, at the window-th point of the run, and is then fixed: a later
    recovery does not retract it. `window` 0: never.
    """

    def __init__(self, margin: float, window: int):
        self.margin, self.window = margin, window
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.run: List[int] = []
        self.collapse_step: Optional[int] = None

    def add(self, step: int, accuracy: float) -> Optional[int]:
        """One validation point; returns the collapse step when this point reveals it."""
        if self.window == 0 or self.collapse_step is not None:
            return None
        if self.best is None or accuracy > self.best:
            self.best, self.best_step, self.run = accuracy, step, []
            return None
        if accuracy >= self.best - self.margin:
            self.run = []
            return None
        self.run.append(step)
        if len(self.run) < self.window:
            return None
        self.collapse_step = self.run[0]
        return self.collapse_step

    def state_dict(self) -> Dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "run": list(self.run),
                "collapse_step": self.collapse_step}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
        self.run, self.collapse_step = list(state["run"]), state["collapse_step"]


def find_collapse_step(points: Sequence[Tuple[int, float]], margin: float, window: int
                       ) -> Optional[int]:
    """`CollapseTracker`'s collapse step over a whole curve of (step, accuracy) points."""
    tracker = CollapseTracker(margin, window)
    for step, accuracy in points:
        tracker.add(step, accuracy)
    return tracker.collapse_step


class CollapseWatch:
    """Alarms and the collapse step for each logged row (`observe`).

    Alarms, each a 0/1 metric `alarm_<metric>` on every row that has the metric, once its
    threshold is set (diagnostics section), and one log line when it starts to fire:
    - a floor: `pseudo_label_acc` (where the answers are known), `entropy_mean` or
      `distinct_answers` strictly below it;
    - `alarm_vote_agreement`: `vote_agreement` >= diagnostics.agreement_alarm while validation
      accuracy falls, i.e. the newest validation point (this row's or an earlier one) is below
      the best point before it.
    `collapse_step` (`CollapseTracker` over `val_accuracy`) appears in the row where it becomes
    known, with a log line.
    """

    def __init__(self, cfg: DiagnosticsConfig):
        self.cfg = cfg
        self.tracker = CollapseTracker(cfg.collapse_margin, cfg.collapse_window)
        self.best_val: Optional[float] = None
        self.falling = False
        self.firing: Dict[str, bool] = {}

    def observe(self, row: Dict[str, Any]) -> Tuple[Dict[str, float], List[str]]:
        """The metrics to add to `row`, and the lines to log."""
        step, out, lines = int(row["step"]), {}, []
        accuracy = _number(row.get("val_accuracy"))
        if accuracy is not None:
            self.falling = self.best_val is not None and accuracy < self.best_val
            self.best_val = accuracy if self.best_val is None else max(self.best_val, accuracy)
            found = self.tracker.add(step, accuracy)
            if found is not None:
                out["collapse_step"] = found
                lines.append(f"step {step}: collapse: validation accuracy has stayed below the "
                             f"best {self.tracker.best:.3f} (step {self.tracker.best_step}) "
                             f"minus diagnostics.collapse_margin {self.cfg.collapse_margin} for "
                             f"{self.cfg.collapse_window} validation points since step {found}")
        for metric, name in FLOORS:
            floor, value = getattr(self.cfg, name), _number(row.get(metric))
            if floor is not None and value is not None:
                self._flag(step, metric, value < floor, out, lines,
                           lambda: f"{metric} {value:.4g} below diagnostics.{name} {floor}")
        limit, agreement = self.cfg.agreement_alarm, _number(row.get("vote_agreement"))
        if limit is not None and agreement is not None:
            self._flag(step, "vote_agreement", agreement >= limit and self.falling, out, lines,
                       lambda: f"vote_agreement {agreement:.4g} at or above "
                       f"diagnostics.agreement_alarm {limit} while validation accuracy falls "
                       f"(the newest point is below the best, {self.best_val:.3f})")
        return out, lines

    def _flag(self, step: int, metric: str, fired: bool, out: Dict[str, float],
              lines: List[str], why: Callable[[], str]) -> None:
        out[f"alarm_{metric}"] = 1.0 if fired else 0.0
        if fired and not self.firing.get(metric):
            lines.append(f"step {step}: alarm: {why()}")
        self.firing[metric] = fired

    def state_dict(self) -> Dict[str, Any]:
        return {"tracker": self.tracker.state_dict(), "best_val": self.best_val,
                "falling": self.falling, "firing": dict(self.firing)}

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        """`state` from `state_dict`; None (a checkpoint from before the watch): start over."""
        if state is None:
            return
        self.tracker.load_state_dict(state["tracker"])
        self.best_val, self.falling = state["best_val"], state["falling"]
        self.firing = dict(state["firing"])


def _number(value: Any) -> Optional[float]:
    """A finite number as float, else None (a metric that is absent, null or NaN says nothing)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None
