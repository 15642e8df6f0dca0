"""The curves of a sweep (tools/sweep.py): one PNG per metric, x = step.

    python tools/plot_sweep.py BASE_RUN_DIR [--metrics reward_mean,entropy_mean,val_accuracy]
                               [--group-by algorithm.mode]

`--metrics collapse` names the per-step signs of collapse (`algorithm/diagnostics.py`); a
preset name and metrics mix (`--metrics collapse,val_accuracy`).

Without --group-by: a line per cell. With it (comma-separated keys allowed): a line per value of
those keys, the mean over the cells that share it (e.g. over seeds) at each step, and a min-max
band. Writes `BASE_RUN_DIR/sweep_<metric>.png`; cells without the metric are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from typing import Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_mgrpo.metrics import read_metrics  # noqa: E402

Series = Dict[int, float]  # step -> value

PRESETS = {"collapse": ["vote_agreement", "vote_margin", "all_identical_frac",
                        "distinct_answers", "policy_momentum_agreement", "entropy_median"]}


def cell_dir(base: str, name: str, cell: Dict) -> str:
    """The cell's run_dir as written (relative to where the sweep ran), else under base."""
    return cell["run_dir"] if os.path.isdir(cell["run_dir"]) else os.path.join(base, name)


def series(rows: List[Dict], metric: str) -> Series:
    return {m["step"]: m[metric] for m in rows
            if isinstance(m.get("step"), int) and isinstance(m.get(metric), (int, float))}


def grouped(runs: List[Tuple[Dict, Series]], keys: List[str]) -> Dict[str, List[Series]]:
    groups: Dict[str, List[Series]] = {}
    for values, s in runs:
        label = ",".join(f"{k}={values.get(k)}" for k in keys)
        groups.setdefault(label, []).append(s)
    return groups


def band(members: List[Series], spread: str = "range"
         ) -> Tuple[List[int], List[float], List[float], List[float]]:
    """Mean and a band at each step any member has, over the members that have it: their min
    and max (`spread` "range"), or the mean -+ their sample std ("std"; 0 for one member)."""
    steps = sorted({st for s in members for st in s})
    at = [[s[st] for s in members if st in s] for st in steps]
    means = [sum(v) / len(v) for v in at]
    if spread == "range":
        return steps, means, [min(v) for v in at], [max(v) for v in at]
    sds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in at]
    return (steps, means, [m - d for m, d in zip(means, sds)],
            [m + d for m, d in zip(means, sds)])


def plot(base: str, metrics: List[str], group_by: Optional[List[str]]) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(base, "cells.json")) as f:
        cells = json.load(f)
    rows = {name: read_metrics(cell_dir(base, name, c)) for name, c in cells.items()}
    written = []
    for metric in metrics:
        runs = [(cells[n]["values"], series(r, metric), n) for n, r in rows.items()]
        runs = [r for r in runs if r[1]]
        if not runs:
            print(f"plot_sweep: no cell has {metric}; no plot", file=sys.stderr)
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        if group_by:
            for label, members in grouped([(v, s) for v, s, _ in runs], group_by).items():
                steps, mean, lo, hi = band(members)
                (line,) = ax.plot(steps, mean, label=f"{label} (n={len(members)})")
                ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
        else:
            for _, s, name in runs:
                steps = sorted(s)
                ax.plot(steps, [s[st] for st in steps], label=name)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        fig.tight_layout()
        path = os.path.join(base, "sweep_" + re.sub(r"[^\w.@-]", "_", metric) + ".png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="plot_sweep.py",
                                     description="Curves of a sweep's cells, one PNG per metric.")
    parser.add_argument("base_run_dir", help="the sweep's base_run_dir (holds cells.json)")
    parser.add_argument("--metrics", default="reward_mean,entropy_mean,val_accuracy",
                        help="comma-separated metrics.jsonl keys, or the preset "
                             f"{' | '.join(PRESETS)} (default %(default)s)")
    parser.add_argument("--group-by", default=None,
                        help="comma-separated grid keys: mean and min-max band per value")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.base_run_dir, "cells.json")):
        print(f"plot_sweep: no cells.json in {args.base_run_dir} (run tools/sweep.py first)",
              file=sys.stderr)
        return 2
    metrics = [m for name in args.metrics.split(",") if name.strip()
               for m in PRESETS.get(name.strip(), [name.strip()])]
    group_by = [k.strip() for k in args.group_by.split(",")] if args.group_by else None
    with open(os.path.join(args.base_run_dir, "cells.json")) as f:
        cells = json.load(f)
    if group_by:
        unknown = [k for k in group_by if not any(k in c["values"] for c in cells.values())]
        if unknown:
            print(f"plot_sweep: --group-by {','.join(unknown)} is not a grid key", file=sys.stderr)
            return 2
    if not any(read_metrics(cell_dir(args.base_run_dir, n, c)) for n, c in cells.items()):
        print(f"plot_sweep: no cell in {args.base_run_dir} has metrics.jsonl", file=sys.stderr)
        return 2
    written = plot(args.base_run_dir, metrics, group_by)
    for path in written:
        print(path)
    return 0 if written else 2


if __name__ == "__main__":
    sys.exit(main())
