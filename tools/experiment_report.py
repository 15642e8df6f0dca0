"""The report of an experiment sweep: plots and tables from its committed raw metrics.

    python tools/experiment_report.py examples/experiments/collapse.yaml [--gather]

1. The raw metrics live in `docs/experiments/<sweep name>/`: `<cell>.metrics.jsonl` per cell
   (the run's metrics.jsonl, keys in `KEPT`, floats to 6 significant digits) and
   `cell_times.jsonl` (tools/sweep.py's wall time per cell). `--gather` first copies them there
   from the sweep's base_run_dir; without it the report is rebuilt from what is committed.
2. It writes `docs/experiments/<sweep name>/*.png` (per arm: the mean over seeds and a +-1 std
   band) and the markdown report (default `docs/experiments.md`, the sweep file's
   `report.out`): the settings, a table shaped like the paper's Table 2, a row per arm with the
   collapse step of every seed (`collapse.find_collapse_step`, the trainer's own rule), the cost,
   and the text of `report.notes` (the human-written reading of the numbers) verbatim.
3. The sweep file's `report` section (tools/sweep.py ignores it):

       report:
         title: Does M-GRPO prevent the collapse of self-rewarding RL?
         out: docs/experiments.md
         notes: docs/experiments/collapse_notes.md
         columns: {SRT: srt_g8, M-GRPO: mgrpo_m0.99, M-GRPO+IQR: mgrpo_iqr, RLVR: rlvr}

   `columns` names the arm behind each of the paper's columns; SRT gets a best and a final.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))

from megatron_mgrpo.collapse import find_collapse_step  # noqa: E402
from megatron_mgrpo.config.reporting import DiagnosticsConfig  # noqa: E402
from megatron_mgrpo.metrics import read_metrics  # noqa: E402
from plot_sweep import band, series  # noqa: E402
from sweep import CELL_TIMES, SweepError, load_sweep, make_cells, yaml_value  # noqa: E402

KEPT = ("step", "val_accuracy", "val_maj", "reward_mean", "pseudo_label_acc", "vote_agreement",
        "vote_margin", "all_identical_frac", "distinct_answers", "policy_momentum_agreement",
        "entropy_mean", "entropy_median", "entropy_q1", "entropy_q3", "iqr_dropped_frac",
        "signal_frac", "trained_frac", "approx_kl", "completion_len", "truncated_frac", "loss",
        "grad_norm", "step_time_s", "rollout_time_s", "train_time_s", "collapse_step")
SMOOTH = 10  # per-step curves: the mean over this many steps (8 prompts a step are noisy)
CURVES = (  # (metric, title, smoothed)
    ("val_accuracy", "validation pass@1", False),
    ("val_maj", "validation maj@k", False),
    ("pseudo_label_acc", "pseudo-label accuracy (vote == true answer)", True),
    ("reward_mean", "reward (agreement with the vote; RLVR: correctness)", True),
    ("vote_agreement", "vote agreement", True),
    ("distinct_answers", "distinct answers per prompt", True),
    ("all_identical_frac", "share of prompts whose completions all agree", True),
    ("iqr_dropped_frac", "IQR filter drop rate", True),
)


class ReportError(ValueError):
    """A bad request: one line, exit status 2."""


def _round(v: Any) -> Any:
    return float(f"{v:.6g}") if isinstance(v, float) and math.isfinite(v) else v


def gather(sweep: Dict[str, Any], cells: List[Dict[str, Any]], raw_dir: str) -> int:
    """Copy each cell's metrics (the KEPT keys) and the cell times into raw_dir."""
    os.makedirs(raw_dir, exist_ok=True)
    n = 0
    for cell in cells:
        rows = read_metrics(cell["run_dir"])
        if not rows:
            continue
        with open(os.path.join(raw_dir, f"{cell['name']}.metrics.jsonl"), "w") as f:
            for row in rows:
                kept = {k: _round(row[k]) for k in KEPT if k in row}
                kept.update({k: row[k] for k in row if k.startswith("alarm_") and row[k]})
                f.write(json.dumps(kept) + "\n")
        n += 1
    times = os.path.join(sweep["base_run_dir"], CELL_TIMES)
    if os.path.isfile(times):
        shutil.copyfile(times, os.path.join(raw_dir, CELL_TIMES))
    return n


def load_raw(cells: List[Dict[str, Any]], raw_dir: str) -> Dict[str, List[Dict[str, Any]]]:
    out = {}
    for cell in cells:
        path = os.path.join(raw_dir, f"{cell['name']}.metrics.jsonl")
        if os.path.isfile(path):
            with open(path) as f:
                out[cell["name"]] = [json.loads(line) for line in f if line.strip()]
    return out


def points(rows: List[Dict[str, Any]], metric: str) -> List[Tuple[int, float]]:
    """(step, value) of the rows that log `metric`, by step (`plot_sweep.series`'s rule)."""
    return sorted((step, float(v)) for step, v in series(rows, metric).items())


def smooth(pts: List[Tuple[int, float]], window: int) -> List[Tuple[int, float]]:
    """Trailing mean over the last `window` points (fewer at the start)."""
    out = []
    for i, (step, _) in enumerate(pts):
        vals = [v for _, v in pts[max(0, i - window + 1):i + 1]]
        out.append((step, sum(vals) / len(vals)))
    return out


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    values = list(values)
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: Sequence[float], digits: int = 3) -> str:
    if not values:
        return "-"
    m, s = mean_std(values)
    return f"{m:.{digits}f} +- {s:.{digits}f}"


class Arm:
    """One arm's seeds: their metrics rows, keyed by cell name."""

    def __init__(self, name: str, overrides: Dict[str, Any], runs: Dict[str, List[Dict]]):
        self.name, self.overrides, self.runs = name, overrides, runs

    def evals(self, metric: str = "val_accuracy") -> List[List[Tuple[int, float]]]:
        return [points(rows, metric) for rows in self.runs.values()]

    def original(self, metric="val_accuracy"):
        return [e[0][1] for e in self.evals(metric) if e and e[0][0] == 0]

    def best(self, metric="val_accuracy"):
        return [max(v for _, v in e) for e in self.evals(metric) if e]

    def best_step(self, metric="val_accuracy"):
        return [max(e, key=lambda p: p[1])[0] for e in self.evals(metric) if e]

    def final(self, metric="val_accuracy"):
        return [e[-1][1] for e in self.evals(metric) if e]

    def last_steps(self):
        return [max((r["step"] for r in rows if isinstance(r.get("step"), int)), default=None)
                for rows in self.runs.values()]

    def collapse_steps(self, margin: float, window: int) -> List[Optional[int]]:
        return [find_collapse_step(e, margin, window) for e in self.evals()]

    def last_value(self, metric: str, window: int = SMOOTH) -> List[float]:
        """Per seed: the mean of the metric over the run's last `window` steps that have it."""
        out = []
        for rows in self.runs.values():
            pts = points(rows, metric)
            if pts:
                out.append(statistics.fmean(v for _, v in pts[-window:]))
        return out


def spread_band(runs: List[List[Tuple[int, float]]]):
    """Mean and +-1 sample std at each step any seed has, over the seeds that have it."""
    return band([dict(pts) for pts in runs], spread="std")


def plot_all(arms: List[Arm], raw_dir: str, iqr_k: float) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {a.name: plt.get_cmap("tab10")(i % 10) for i, a in enumerate(arms)}
    written = []
    for metric, title, smoothed in CURVES:
        have = [a for a in arms if any(points(rows, metric) for rows in a.runs.values())]
        if not have:
            continue
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        for arm in have:
            runs = [points(rows, metric) for rows in arm.runs.values()]
            runs = [smooth(p, SMOOTH) if smoothed else p for p in runs if p]
            steps, mean, lo, hi = spread_band(runs)
            ax.plot(steps, mean, color=colors[arm.name], label=f"{arm.name} (n={len(runs)})",
                    marker=None if smoothed else ".")
            ax.fill_between(steps, lo, hi, color=colors[arm.name], alpha=0.15)
        ax.set_title(title + (f" ({SMOOTH}-step mean)" if smoothed else ""), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        written.append(_save(fig, plt, raw_dir, metric))
    # Entropy: the median, the Q1-Q3 band and the IQR fence Q1 - k (Q3 - Q1), a panel per arm.
    have = [a for a in arms if any(points(rows, "entropy_q1") for rows in a.runs.values())]
    if have:
        cols = min(4, len(have))
        nrows = -(-len(have) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False,
                                 sharey=True)
        for ax, arm in zip(axes.flat, have):
            per = {}
            for key in ("entropy_q1", "entropy_median", "entropy_q3"):
                per[key] = spread_band([smooth(points(rows, key), SMOOTH)
                                 for rows in arm.runs.values() if points(rows, key)])
            steps = per["entropy_median"][0]
            q1, med, q3 = (per[k][1] for k in ("entropy_q1", "entropy_median", "entropy_q3"))
            ax.plot(steps, med, color=colors[arm.name], label="median")
            ax.fill_between(per["entropy_q1"][0], q1, q3, color=colors[arm.name], alpha=0.25,
                            label="Q1-Q3")
            ax.plot(steps, [a - iqr_k * (b - a) for a, b in zip(q1, q3)], "k--", lw=0.8,
                    label=f"fence (k={iqr_k})")
            ax.set_title(arm.name, fontsize=9)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(have):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=6)
        fig.suptitle(f"token entropy (nats): median, Q1-Q3, IQR fence; {SMOOTH}-step mean",
                     fontsize=9)
        fig.tight_layout()
        written.append(_save(fig, plt, raw_dir, "entropy_quartiles"))
    return written


def _save(fig, plt, raw_dir: str, name: str) -> str:
    path = os.path.join(raw_dir, f"{name}.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def read_cell_times(raw_dir: str) -> List[Dict[str, Any]]:
    """tools/sweep.py's records of each cell's (or resumed piece's) wall time; [] without."""
    path = os.path.join(raw_dir, CELL_TIMES)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def wall_clock_h(times: List[Dict[str, Any]]) -> Optional[float]:
    """Hours from the first cell's start to the last one's end (the records' `end`)."""
    import datetime

    spans = []
    for t in times:
        if "end" in t:
            end = datetime.datetime.strptime(t["end"], "%Y-%m-%d %H:%M:%S").timestamp()
            spans.append((end - float(t["seconds"]), end))
    if not spans:
        return None
    return (max(e for _, e in spans) - min(s for s, _ in spans)) / 3600


def cell_costs(times: List[Dict[str, Any]]) -> Dict[str, float]:
    """Seconds per cell, summed over its resumed pieces."""
    out: Dict[str, float] = {}
    for t in times:
        out[t["cell"]] = out.get(t["cell"], 0.0) + float(t["seconds"])
    return out


def render(sweep_path: str, sweep: Dict[str, Any], report: Dict[str, Any], arms: List[Arm],
           raw_dir: str, out_path: str, figures: List[str], diag: DiagnosticsConfig) -> str:
    rel = lambda p: os.path.relpath(p, os.path.dirname(out_path) or ".")  # noqa: E731
    by_name = {a.name: a for a in arms}
    lines = [f"# {report.get('title', 'Experiment ' + os.path.basename(sweep_path))}", "",
             f"Generated by `python tools/experiment_report.py {sweep_path}` from the raw "
             f"metrics in `{_shown(raw_dir)}/`; do not edit by hand (the reading "
             f"of the numbers is `{report.get('notes', '(none)')}`).", ""]
    notes = report.get("notes")
    if notes and os.path.isfile(os.path.join(REPO, notes)):
        with open(os.path.join(REPO, notes)) as f:
            lines += [f.read().rstrip(), ""]
    lines += ["## Settings", "",
              f"Sweep `{sweep_path}` on `{sweep['config']}` with, for every cell: "
              + ", ".join(f"`{k}={yaml_value(v)}`" for k, v in sweep["fixed"].items()) + ".", "",
              "| arm | overrides | seeds (finished / run) |", "| --- | --- | --- |"]
    steps_goal = sweep["fixed"].get("training.steps")
    for arm in arms:
        done = sum(s == steps_goal for s in arm.last_steps())
        lines.append(f"| {arm.name} | " + ", ".join(f"`{k}={yaml_value(v)}`" for k, v in arm.overrides.items())
                     + f" | {done} / {len(arm.runs)} |")
    cols = report.get("columns") or {}
    metric_rows = (("val_accuracy", "validation pass@1"), ("val_maj", "validation maj@k"))
    if cols:
        header = ["original"]
        for label, arm in cols.items():
            header += [f"{label}-best", f"{label}-final"] if label == "SRT" else [f"{label}-final"]
        lines += ["", "## The paper's table, on this task", "",
                  "Mean +- sample std over seeds; best = each seed's highest validation point. "
                  "Arms: " + ", ".join(f"{k} = `{v}`" for k, v in cols.items()) + ".", "",
                  "| | " + " | ".join(header) + " |", "| --- " * (len(header) + 1) + "|"]
        for metric, label in metric_rows:
            cells = [fmt([v for a in arms for v in a.original(metric)])]
            for col, arm_name in cols.items():
                arm = by_name.get(arm_name, Arm(arm_name, {}, {}))  # not run yet: "-"
                if col == "SRT":
                    cells.append(fmt(arm.best(metric)))
                cells.append(fmt(arm.final(metric)))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Every arm", "",
              f"Collapse step: the first validation step after the best point from which "
              f"validation pass@1 stays below best - {diag.collapse_margin} for "
              f"{diag.collapse_window} validation points in a row (`collapse.find_collapse_step`, "
              f"the trainer's rule), per seed; `-` = none. Entropy and agreement: the mean over "
              f"each run's last {SMOOTH} steps.", "",
              "| arm | best pass@1 | best step | final pass@1 | final - best | final maj@k "
              "| collapse step per seed | final entropy | final agreement "
              "| final pseudo-label acc |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm in arms:
        drops = [f - b for f, b in zip(arm.final(), arm.best())]
        steps = arm.collapse_steps(diag.collapse_margin, diag.collapse_window)
        lines.append(
            f"| {arm.name} | {fmt(arm.best())} | "
            + (", ".join(str(s) for s in arm.best_step()) or "-") + f" | {fmt(arm.final())} | "
            f"{fmt(drops)} | {fmt(arm.final('val_maj'))} | "
            + (", ".join("-" if s is None else str(s) for s in steps) or "-") + " | "
            f"{fmt(arm.last_value('entropy_mean'))} | {fmt(arm.last_value('vote_agreement'))} | "
            f"{fmt(arm.last_value('pseudo_label_acc'))} |")
    lines += ["", "## Curves", "",
              "Mean over seeds, band +-1 std; per-step metrics smoothed over "
              f"{SMOOTH} steps.", ""]
    lines += [f"![{os.path.basename(p)[:-4]}]({rel(p)})" for p in figures]
    times = read_cell_times(raw_dir)
    costs = cell_costs(times)
    if costs:
        lines += ["", "## Cost", "",
                  "Wall seconds per run (tools/sweep.py's `cell_times.jsonl`, a run's resumed "
                  "pieces summed), mean over seeds; the sum is the grid's single-stream time.",
                  "", "| arm | seconds per run |", "| --- | --- |"]
        for arm in arms:
            secs = [costs[c] for c in arm.runs if c in costs]
            lines.append(f"| {arm.name} | {fmt(secs, 0)} |")
        lines += ["", f"All cells: {sum(costs.values()) / 3600:.2f} h of run time."]
        wall = wall_clock_h(times)
        if wall is not None:
            jobs = sorted({t.get("jobs", 1) for t in times})
            lines[-1] += (f" The grid took {wall:.2f} h of wall clock, "
                          f"{'/'.join(map(str, jobs))} cells at a time.")
    return "\n".join(lines) + "\n"


def _shown(path: str) -> str:
    """A path as the report shows it: relative to the repository when inside it."""
    rel = os.path.relpath(os.path.abspath(path), REPO)
    return path if rel.startswith("..") else rel


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="experiment_report.py",
                                     description="Plots and tables of an experiment sweep.")
    parser.add_argument("sweep", help="the sweep file (with a report section)")
    parser.add_argument("--gather", action="store_true",
                        help="first copy the cells' metrics from the sweep's base_run_dir")
    parser.add_argument("--out", default=None, help="markdown report (default: report.out)")
    parser.add_argument("--raw-dir", default=None,
                        help="the raw metrics and figures (default docs/experiments/<sweep name>)")
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep)
        cells = make_cells(sweep)
        with open(args.sweep) as f:
            report = (yaml.safe_load(f) or {}).get("report") or {}
        name = os.path.splitext(os.path.basename(args.sweep))[0]
        raw_dir = args.raw_dir or os.path.join(REPO, "docs", "experiments", name)
        for col, arm_name in (report.get("columns") or {}).items():
            if arm_name not in (sweep.get("arms") or {}):
                raise ReportError(f"report.columns.{col}: no arm {arm_name!r} in the sweep")
        out_path = args.out or os.path.join(REPO, report.get("out", "docs/experiments.md"))
        if args.gather:
            print(f"gathered {gather(sweep, cells, raw_dir)} of {len(cells)} cells into {raw_dir}")
        runs = load_raw(cells, raw_dir)
        if not runs:
            raise ReportError(f"no raw metrics in {raw_dir} (run with --gather after the sweep)")
        arms: List[Arm] = []
        for cell in cells:
            arm_name = cell["values"].get("arm", cell["name"])
            if not arms or arms[-1].name != arm_name:
                arms.append(Arm(arm_name, (sweep.get("arms") or {}).get(arm_name, {}), {}))
            if cell["name"] in runs:
                arms[-1].runs[cell["name"]] = runs[cell["name"]]
        arms = [a for a in arms if a.runs]
        iqr_k = float(sweep["fixed"].get("algorithm.iqr_k", 0.75))
        figures = plot_all(arms, raw_dir, iqr_k)
        text = render(args.sweep, sweep, report, arms, raw_dir, out_path, figures,
                      DiagnosticsConfig())
    except (SweepError, ReportError) as e:
        print(f"experiment_report: {e}", file=sys.stderr)
        return 2
    with open(out_path, "w") as f:
        f.write(text)
    print(f"{out_path}: {len(arms)} arms, {sum(len(a.runs) for a in arms)} runs, "
          f"{len(figures)} figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
