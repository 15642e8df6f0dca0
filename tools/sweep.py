"""A grid of training runs from one sweep file, run here or as a slurm array, then collected.

    python tools/sweep.py SWEEP [--local] [--jobs N] run the cells here, N at a time (default 1)
    python tools/sweep.py SWEEP --slurm SCRIPT      write <base_run_dir>/sweep_array.sh
    python tools/sweep.py SWEEP --dry-run           print the command lines and the manifest
    python tools/sweep.py SWEEP --collect           write <base_run_dir>/summary.csv
    python tools/plot_sweep.py BASE_RUN_DIR         the curves of every cell (see that file)

The sweep file (YAML or JSON):

    config: examples/tiny/config.yaml
    base_run_dir: runs/sweep_tiny           # default: runs/<sweep file name>
    grid:                                   # cartesian product of config override keys
      rollout.num_momentum_rollouts: [0, 2]
      algorithm.mode: [mgrpo, srt]
      training.seed: [1, 2]
    fixed: {training.steps: 20}             # optional: overrides for every cell

or, where the compared settings are not a product (`examples/experiments/collapse.yaml`), named
arms, each a set of overrides, crossed with the grid:

    arms:
      srt_g8: {algorithm.mode: srt, rollout.num_policy_rollouts: 8}
      mgrpo: {algorithm.mode: mgrpo, algorithm.momentum: 0.99}
    grid: {training.seed: [1, 2, 3]}        # optional with arms

1. Cells are the product of the grid lists, in the order the keys are written (with arms: each
   arm in order, then that product). A cell's name is its grid values, keys sorted
   (`algorithm.mode=srt,rollout.num_momentum_rollouts=0,...`), after `<arm>,` with arms, made
   filesystem-safe; its run_dir is `<base_run_dir>/<name>`. `cells.json` in base_run_dir maps
   each name to its index, values (the grid's, and `arm`), overrides (arm + grid + fixed) and
   run_dir. A key set by two of arm, grid and fixed is refused.
2. --local runs `mgrpo train CONFIG --training.run_dir DIR <overrides>` per cell, output in
   `<run_dir>/sweep.log`, --jobs cells at a time (each child gets OMP_NUM_THREADS = the CPUs
   over --jobs unless it is set). A cell whose metrics.jsonl ends at its training.steps is
   skipped; one with metrics short of that (or when the steps are unknown) continues with
   --training.resume true, so rerunning the sweep after an interruption finishes it. A failed
   cell does not stop the others; the exit status is 1 if any failed. Each cell's wall time is
   appended to `<base_run_dir>/cell_times.jsonl`.
3. --slurm SCRIPT writes an array job: task i exports RUN_DIR (and CONFIG) of cell i and runs
   `bash SCRIPT -- <overrides>`; its #SBATCH lines are SCRIPT's plus --array. It prints the
   sbatch command; it does not submit.
4. A `report` section is tools/experiment_report.py's; this tool ignores it.
5. Which combinations are valid is the trainer's config check's business, not this file's.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_mgrpo.metrics import read_metrics  # noqa: E402

TOP_LEVEL_KEYS = ("config", "base_run_dir", "arms", "grid", "fixed", "report")
MANIFEST = "cells.json"
ARRAY_SCRIPT = "sweep_array.sh"
SUMMARY = "summary.csv"
CELL_TIMES = "cell_times.jsonl"
LOG = "sweep.log"
TRAIN_COMMAND = [sys.executable, "-m", "megatron_mgrpo.cli", "train"]


class SweepError(ValueError):
    """A malformed sweep file or request: reported as one line, exit status 2."""


# ---------------------------------------------------------------------------------- sweep file


def load_sweep(path: str) -> Dict[str, Any]:
    """Read and check a sweep file; returns {config, base_run_dir, grid, fixed}."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise SweepError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not YAML/JSON: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: expected a mapping with config and grid")
    unknown = sorted(str(k) for k in raw if k not in TOP_LEVEL_KEYS)
    if unknown:
        raise SweepError(f"{path}: unknown top-level key(s) {', '.join(unknown)} "
                         f"(known: {', '.join(TOP_LEVEL_KEYS)})")
    if not isinstance(raw.get("config"), str) or not raw["config"]:
        raise SweepError(f"{path}: missing config (the training config file)")
    arms = raw.get("arms") or {}
    if not isinstance(arms, dict):
        raise SweepError(f"{path}: arms must be a mapping of arm name -> overrides")
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict) or not (grid or arms):
        raise SweepError(f"{path}: empty grid (a mapping of override key -> list of values)")
    for arm, overrides in arms.items():
        if not isinstance(arm, str) or not re.fullmatch(r"[\w.+-]+", arm):
            raise SweepError(f"{path}: arm name {arm!r} is not made of letters, digits, _.+-")
        if not isinstance(overrides, dict):
            raise SweepError(f"{path}: arms.{arm} must be a mapping of override key -> value")
        for key in overrides:
            _check_key(path, key)
            if key in grid:
                raise SweepError(f"{path}: {key} is in both arms.{arm} and grid")
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise SweepError(f"{path}: fixed must be a mapping of override key -> value")
    for key, values in grid.items():
        _check_key(path, key)
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: grid.{key} must be a non-empty list of values, "
                             f"got {values!r}")
    for key in fixed:
        _check_key(path, key)
        if key in grid:
            raise SweepError(f"{path}: {key} is in both grid and fixed")
        arm = next((a for a, o in arms.items() if key in o), None)
        if arm is not None:
            raise SweepError(f"{path}: {key} is in both arms.{arm} and fixed")
    base = raw.get("base_run_dir")
    if base is None:
        base = os.path.join("runs", os.path.splitext(os.path.basename(path))[0])
    if not isinstance(base, str) or not base:
        raise SweepError(f"{path}: base_run_dir must be a path")
    return {"config": raw["config"], "base_run_dir": base, "arms": arms, "grid": grid,
            "fixed": fixed}


def _check_key(path: str, key: Any) -> None:
    if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", key):
        raise SweepError(f"{path}: {key!r} is not a dotted config key like training.seed")
    if key == "training.run_dir":
        raise SweepError(f"{path}: training.run_dir is set per cell by the sweep")


# ---------------------------------------------------------------------------------- cells


def yaml_value(value: Any) -> str:
    """A value as the CLI's YAML override parser reads it back (`true`, `null`, `'1'`, [a, b])."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()
    return text[:-len("...")].strip() if text.endswith("...") else text


def cell_name(values: Dict[str, Any], arm: Optional[str] = None) -> str:
    """`k=v` over the sorted keys, joined by commas (after `arm`), anything but [\\w.=,+-] `_`."""
    name = ",".join([arm] * (arm is not None)
                    + [f"{k}={yaml_value(values[k])}" for k in sorted(values)])
    name = re.sub(r"[^\w.=,+-]", "_", name)
    if len(name) > 200:  # file names stop at 255 bytes
        name = name[:180] + "~" + hashlib.sha1(name.encode()).hexdigest()[:12]
    return name


def make_cells(sweep: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Each arm (or none) x the grid's product (first key slowest): name, overrides, run_dir."""
    keys = list(sweep["grid"])
    arms = sweep.get("arms") or {None: {}}
    cells = []
    for arm, arm_overrides in arms.items():
        for combo in itertools.product(*(sweep["grid"][k] for k in keys)):
            values = dict(zip(keys, combo))
            name = cell_name(values, arm)
            cells.append({"name": name, "index": len(cells),
                          "values": values if arm is None else {"arm": arm, **values},
                          "overrides": {**arm_overrides, **values, **sweep["fixed"]},
                          "run_dir": os.path.join(sweep["base_run_dir"], name)})
    names = [c["name"] for c in cells]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise SweepError(f"two cells are both named {dup} (repeated grid values?)")
    return cells


def override_args(cell: Dict[str, Any]) -> List[str]:
    return [a for k, v in cell["overrides"].items() for a in (f"--{k}", yaml_value(v))]


def manifest(cells: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {c["name"]: {"index": c["index"], "values": c["values"],
                        "overrides": c["overrides"], "run_dir": c["run_dir"]} for c in cells}


def write_manifest(sweep: Dict[str, Any], cells: List[Dict[str, Any]]) -> str:
    os.makedirs(sweep["base_run_dir"], exist_ok=True)
    path = os.path.join(sweep["base_run_dir"], MANIFEST)
    with open(path, "w") as f:
        json.dump(manifest(cells), f, indent=2)
        f.write("\n")
    return path


def target_steps(sweep: Dict[str, Any], cell: Dict[str, Any]) -> Optional[int]:
    """The cell's training.steps: its override, else the config file's, else unknown."""
    steps = cell["overrides"].get("training.steps")
    if steps is None:
        try:
            with open(sweep["config"]) as f:
                raw = yaml.safe_load(f) or {}
            steps = (raw.get("training") or {}).get("steps")
        except (OSError, yaml.YAMLError, AttributeError):
            steps = None
    return steps if isinstance(steps, int) and not isinstance(steps, bool) else None


def last_step(run_dir: str) -> Optional[int]:
    rows = [m for m in read_metrics(run_dir) if isinstance(m.get("step"), int)]
    return rows[-1]["step"] if rows else None


# ---------------------------------------------------------------------------------- modes


def run_local(sweep: Dict[str, Any], cells: List[Dict[str, Any]], command: List[str],
              jobs: int = 1) -> int:
    write_manifest(sweep, cells)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:  # N cells share the CPUs, not each all of them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    done: Dict[str, List[str]] = {"ok": [], "skipped": [], "failed": []}
    n = len(cells)
    todo = []
    for cell in cells:
        head = f"[{cell['index'] + 1}/{n}] {cell['name']}"
        steps, last = target_steps(sweep, cell), last_step(cell["run_dir"])
        if last is not None and steps is not None and last >= steps:
            print(f"{head}: skipped (finished at step {last})", flush=True)
            done["skipped"].append(cell["name"])
            continue
        cmd = [*command, sweep["config"], "--training.run_dir", cell["run_dir"],
               *override_args(cell)]
        if last is not None:  # interrupted (or steps unknown): continue from its checkpoint
            cmd += ["--training.resume", "true"]
        todo.append((head, cell, cmd, last is not None))
    running: List[Any] = []
    while todo or running:
        while todo and len(running) < jobs:
            head, cell, cmd, resume = todo.pop(0)
            os.makedirs(cell["run_dir"], exist_ok=True)
            log = open(os.path.join(cell["run_dir"], LOG), "a")
            log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
            log.flush()
            print(f"{head}: running{' (resume)' if resume else ''}", flush=True)
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((head, cell, proc, log, time.time(), resume))
        time.sleep(0.05 if jobs == 1 else 1.0)
        for entry in [e for e in running if e[2].poll() is not None]:
            running.remove(entry)
            head, cell, proc, log, start, resume = entry
            log.close()
            took, rc = time.time() - start, proc.returncode
            with open(os.path.join(sweep["base_run_dir"], CELL_TIMES), "a") as f:
                f.write(json.dumps({"cell": cell["name"], "seconds": round(took, 1),
                                    "exit": rc, "resumed": resume, "jobs": jobs,
                                    "end": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
            if rc == 0:
                print(f"{head}: ok ({took:.0f} s)", flush=True)
                done["ok"].append(cell["name"])
            else:
                log_path = os.path.join(cell["run_dir"], LOG)
                print(f"{head}: failed (exit {rc}, {took:.0f} s), log: {log_path}", flush=True)
                done["failed"].append(f"{cell['name']}: exit {rc}, log: {log_path}")
    print(f"sweep: {len(done['ok'])} ok, {len(done['skipped'])} skipped, "
          f"{len(done['failed'])} failed of {n} cells")
    for line in done["failed"]:
        print(f"  failed {line}")
    return 1 if done["failed"] else 0


def array_script(sweep: Dict[str, Any], cells: List[Dict[str, Any]], script: str) -> str:
    """A slurm array job over the cells: SCRIPT's #SBATCH lines, --array, one case per index."""
    with open(script) as f:
        sbatch = [line.rstrip("\n") for line in f if line.startswith("#SBATCH")]
    sbatch = [line for line in sbatch if not re.match(r"#SBATCH\s+(--array|--output|-o\b)", line)]
    lines = ["#!/bin/bash",
             f"# Sweep {sweep['base_run_dir']}: {len(cells)} cells of {sweep['config']} "
             f"through {script}.",
             f"# Written by tools/sweep.py; cell i is entry i of {MANIFEST}.",
             *sbatch,
             f"#SBATCH --array=0-{len(cells) - 1}",
             "#SBATCH --output=slurm-%x-%A_%a.out",
             "set -euo pipefail",
             "",
             'cd "${SLURM_SUBMIT_DIR:-.}"',
             'case "${SLURM_ARRAY_TASK_ID:?run me with sbatch (an array job)}" in']
    for cell in cells:
        args = " ".join(shlex.quote(a) for a in override_args(cell))
        lines.append(f"  {cell['index']}) RUN_DIR={shlex.quote(cell['run_dir'])}; "
                     f"OVERRIDES=({args}) ;;")
    lines += ['  *) echo "sweep_array.sh: no cell $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;',
              "esac",
              f"CONFIG={shlex.quote(sweep['config'])}",
              "export RUN_DIR CONFIG",
              'echo "# sweep cell $SLURM_ARRAY_TASK_ID: $RUN_DIR"',
              f'exec bash {shlex.quote(script)} -- "${{OVERRIDES[@]}}"', ""]
    return "\n".join(lines)


def collect(sweep: Dict[str, Any], cells: List[Dict[str, Any]]) -> int:
    """summary.csv: one row per cell, its grid values and final/best metrics."""
    rows, bench = [], set()
    for cell in cells:
        metrics = read_metrics(cell["run_dir"])
        bench |= {k for m in metrics for k in m if k.endswith("/pass@1")}
        rows.append((cell, metrics))
    bench_keys = sorted(bench)
    keys = ["arm"] * bool(sweep.get("arms")) + list(sweep["grid"])
    header = [*keys, "name", "last_step", "val_accuracy_final", "val_accuracy_best",
              "reward_mean_final", "entropy_mean_final", "collapse_step", *bench_keys]
    have = 0
    path = os.path.join(sweep["base_run_dir"], SUMMARY)
    os.makedirs(sweep["base_run_dir"], exist_ok=True)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(header)
        for cell, metrics in rows:
            have += bool(metrics)
            out.writerow([*(yaml_value(cell["values"][k]) for k in keys), cell["name"],
                          *summary_values(metrics, bench_keys)])
    print(f"{path}: {len(cells)} cells, {have} with metrics")
    return 0


def summary_values(metrics: List[Dict[str, Any]], bench_keys: List[str]) -> List[Any]:
    def series(key):
        return [m[key] for m in metrics if isinstance(m.get(key), (int, float))]

    def last(key):
        s = series(key)
        return s[-1] if s else ""

    acc = series("val_accuracy")
    steps = [m["step"] for m in metrics if isinstance(m.get("step"), int)]
    evals = [m for m in metrics if any(m.get(k) is not None for k in bench_keys)]
    at_eval = [evals[-1].get(k, "") if evals else "" for k in bench_keys]
    collapse = series("collapse_step")  # logged once, when the run's CollapseWatch found it
    return [steps[-1] if steps else "", last("val_accuracy"), max(acc) if acc else "",
            last("reward_mean"), last("entropy_mean"), collapse[0] if collapse else "",
            *("" if v is None else v for v in at_eval)]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sweep.py", description="A grid of training runs from a sweep file "
                                     "(see the top of tools/sweep.py).")
    parser.add_argument("sweep", help="sweep file (YAML or JSON)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_true",
                      help="run the cells here, one after another (default)")
    mode.add_argument("--slurm", metavar="SCRIPT",
                      help="write a slurm array script running SCRIPT per cell (no sbatch)")
    mode.add_argument("--collect", action="store_true",
                      help="write summary.csv from the cells' metrics.jsonl")
    parser.add_argument("--dry-run", action="store_true",
                        help="print each cell's command and the manifest; write nothing")
    parser.add_argument("--jobs", type=int, default=1,
                        help="with --local: cells run at the same time (default 1)")
    parser.add_argument("--max-cells", type=int, default=64,
                        help="refuse grids with more cells than this (default 64)")
    parser.add_argument("--command", default=None,
                        help="replace `python -m megatron_mgrpo.cli train` (for tests and custom "
                             "entry points; split like a shell would)")
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep)
        cells = make_cells(sweep)
        if len(cells) > args.max_cells:
            raise SweepError(f"{len(cells)} cells is more than --max-cells {args.max_cells}")
        if args.jobs < 1:
            raise SweepError(f"--jobs {args.jobs}: must be >= 1")
        if args.slurm and not os.path.isfile(args.slurm):
            raise SweepError(f"no launcher script {args.slurm}")
    except SweepError as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 2
    command = shlex.split(args.command) if args.command else TRAIN_COMMAND
    if args.collect:
        return collect(sweep, cells)
    if args.slurm:
        text = array_script(sweep, cells, args.slurm)
        if args.dry_run:
            print(text, end="")
            return 0
        write_manifest(sweep, cells)
        path = os.path.join(sweep["base_run_dir"], ARRAY_SCRIPT)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o755)
        print(f"{path}: {len(cells)} cells")
        print(f"sbatch {shlex.quote(path)}")
        return 0
    if args.dry_run:
        for cell in cells:
            print(shlex.join([*command, sweep["config"], "--training.run_dir", cell["run_dir"],
                              *override_args(cell)]))
        print(json.dumps(manifest(cells), indent=2))
        return 0
    return run_local(sweep, cells, command, args.jobs)


if __name__ == "__main__":
    sys.exit(main())
