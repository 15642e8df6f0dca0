"""Measure the README's figures and rewrite their blocks, so they cannot drift from the code.

    make readme-figures                       # = python tools/readme_figures.py
    python tools/readme_figures.py [--config examples/tiny/config.yaml] [--steps N]
        [--out runs/readme_figures] [--base DIR] [--prepare-args "..."]
        [--sweep examples/sweep_tiny.yaml | --no-sweep] [--sweep-steps N]
        [--readme README.md] [--no-write]

What it runs, each into a fresh directory under --out (a directory this script made before is
emptied; any other non-empty one is refused), with this interpreter, so no venv needs activating:

1. The warm-up base, as `make train` builds it: `tools/prepare_tiny.py --out OUT/tiny_base`,
   timed (skipped with `--base DIR`, which reuses a built base). Its `base_eval.json` gives the
   base's greedy accuracy, pass@1 and maj@k.
2. The demo: `mgrpo train CONFIG --training.run_dir OUT/tiny` with `model.load` and the data
   paths pointed at the base (and `--training.steps N` with --steps), timed. Base and final
   validation pass@1 / maj@k, the peak, reward, entropy and pseudo-label accuracy are read from
   its metrics.jsonl.
3. The sweep (unless --no-sweep): `tools/sweep.py` on a copy of the sweep file pointed at the
   base, timed; then run again (every cell must be skipped), `--collect` and
   `tools/plot_sweep.py`; each cell's validation pass@1 at step 0 and at its last step.

Then it replaces the text between `<!-- figures:NAME -->` and `<!-- /figures:NAME -->` in the
README (NAME: demo, sweep) with the figures, the date, the commit and this command. Relative
paths are from the repository root.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from typing import Any, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH = 96  # the README's line length
MARK = ".readme_figures"  # marks --out as this script's own, so a rerun may empty it


class FiguresError(RuntimeError):
    """A step failed or a block is missing: reported as one line, exit status 1."""


# ------------------------------------------------------------------------------------ blocks


def replace_block(text: str, name: str, body: str) -> str:
    """`text` with everything between `<!-- figures:NAME -->` and `<!-- /figures:NAME -->`
    replaced by `body`. A block whose old content started on a new line gets `body` on its own
    lines; an inline one (inside a paragraph or list item) stays inline."""
    start, end = f"<!-- figures:{name} -->", f"<!-- /figures:{name} -->"
    pattern = re.compile(re.escape(start) + r"(.*?)" + re.escape(end), re.S)
    found = pattern.findall(text)
    if len(found) != 1 or text.count(start) != 1 or text.count(end) != 1:
        raise FiguresError(f"README: expected one '{start}' ... '{end}' block, "
                           f"found {text.count(start)} start and {text.count(end)} end markers")
    body = body.strip("\n")
    if found[0].startswith("\n"):
        new = f"\n{body}\n"
    else:  # wrapped like the paragraph around it: its indentation, lines of at most WIDTH
        line_start = text.rfind("\n", 0, text.index(start)) + 1
        line = text[line_start:text.index(start)]
        item = re.match(r"\s*(?:[-*+]|\d+\.)\s+", line)  # a list item's text column
        indent = " " * len(item.group(0)) if item else line[:len(line) - len(line.lstrip())]
        first = " " * (len(line) + len(start))
        new = textwrap.fill(" ".join(body.split()), WIDTH, initial_indent=first,
                            subsequent_indent=indent, break_long_words=False,
                            break_on_hyphens=False)[len(first):]
    return pattern.sub(lambda _: start + new + end, text)


def fmt_duration(seconds: float) -> str:
    """426 -> '7 min 6 s'; 45.2 -> '45 s'."""
    s = int(round(seconds))
    return f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"


def _range_pct(values: Sequence[float]) -> str:
    lo, hi = round(100 * min(values)), round(100 * max(values))
    return f"{lo}%" if lo == hi else f"{lo}-{hi}%"


def demo_figures(rows: List[Dict[str, Any]], base_eval: Dict[str, Any]) -> Dict[str, Any]:
    """The demo's figures from its metrics.jsonl rows and the base's base_eval.json."""
    steps = [r for r in rows if isinstance(r.get("step"), int)]
    evals = [r for r in steps if r.get("val_accuracy") is not None]
    trained = [r for r in steps if r["step"] >= 1 and r.get("reward_mean") is not None]
    if not evals or evals[0]["step"] != 0 or len(evals) < 2 or not trained:
        raise FiguresError("metrics.jsonl: need validation at step 0 and at a later step, and "
                           "trained steps (is training.eval_interval > 0?)")
    last = evals[-1]
    peak = max(evals[1:], key=lambda r: (r["val_accuracy"], -r["step"]))
    plabel = [r["pseudo_label_acc"] for r in trained if r.get("pseudo_label_acc") is not None]
    k = base_eval.get("k")
    return {
        "steps": trained[-1]["step"],
        "base_pass1": evals[0]["val_accuracy"], "base_maj": evals[0].get("val_maj"),
        "final_pass1": last["val_accuracy"], "final_maj": last.get("val_maj"),
        "final_step": last["step"],
        "peak_pass1": peak["val_accuracy"], "peak_step": peak["step"],
        "reward_first": trained[0].get("reward_mean"),
        "reward_last": trained[-1].get("reward_mean"),
        "entropy_first": trained[0].get("entropy_mean"),
        "entropy_last": trained[-1].get("entropy_mean"),
        "pseudo_label_range": _range_pct(plabel) if plabel else None,
        "warmup_greedy": base_eval.get("greedy"), "warmup_pass1": base_eval.get("pass@1"),
        "warmup_maj": base_eval.get(f"maj@{k}"), "warmup_k": k,
        "warmup_prompts": base_eval.get("num_prompts"),
    }


def render_demo(fig: Dict[str, Any], run: Dict[str, Any], provenance: str) -> str:
    """The demo block: what was run, how long it took, the table, the base's own measurement."""
    f3 = "{:.3f}".format
    peak = ""
    if fig["peak_step"] != fig["final_step"]:
        peak = f" (peak {f3(fig['peak_pass1'])} at step {fig['peak_step']})"
    n = fig["steps"]
    lines = [
        f"What it printed here ({provenance}): the warm-up "
        f"{fmt_duration(run['warmup_s']) if run.get('warmup_s') is not None else 'was reused'}"
        f", the {n} RL steps {fmt_duration(run['train_s'])}"
        + (f", {fmt_duration(run['warmup_s'] + run['train_s'])} in all"
           if run.get("warmup_s") is not None else "") + ":",
        "",
        f"| | base (step 0) | after {n} {run.get('method', 'M-GRPO')} steps |",
        "| --- | --- | --- |",
        f"| validation pass@1 (mean of {run['eval_samples']} samples at T = "
        f"{run['temperature']:g}, {run['val_prompts']} prompts) | {f3(fig['base_pass1'])} | "
        f"**{f3(fig['final_pass1'])}**{peak} |",
        f"| validation maj@{run['eval_samples']} | {f3(fig['base_maj'])} | "
        f"{f3(fig['final_maj'])} |",
        f"| reward (agreement with the vote), step 1 -> {n} | {f3(fig['reward_first'])} | "
        f"{f3(fig['reward_last'])} |",
        f"| mean trajectory entropy, step 1 -> {n} | {f3(fig['entropy_first'])} | "
        f"{f3(fig['entropy_last'])} |",
        "",
    ]
    notes = []
    if fig["pseudo_label_range"]:
        notes.append(f"The pseudo-label was right on {fig['pseudo_label_range']} of a step's "
                     "prompts (`pseudo_label_acc`, measured with the hidden answers, never "
                     "trained on).")
    if fig["warmup_pass1"] is not None:
        k = fig["warmup_k"]
        notes.append(
            f"`tools/prepare_tiny.py` measured the warm-up base at pass@1 "
            f"{f3(fig['warmup_pass1'])} and maj@{k} {f3(fig['warmup_maj'])} (greedy "
            f"{f3(fig['warmup_greedy'])}; {k} samples at T = 1 on the "
            f"{fig['warmup_prompts']} validation prompts; `base_eval.json`).")
    lines.append(" ".join(notes))
    return "\n".join(line if line.startswith("|") else _wrap(line) for line in lines).rstrip()


def _wrap(paragraph: str) -> str:
    return textwrap.fill(paragraph, WIDTH, break_long_words=False, break_on_hyphens=False)


def sweep_figures(cells: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    """Per cell name: validation pass@1 at step 0 and at its last evaluated step."""
    out = {}
    for name, rows in cells.items():
        evals = [r for r in rows if r.get("val_accuracy") is not None]
        if not evals or evals[0].get("step") != 0:
            raise FiguresError(f"sweep cell {name}: no validation at step 0")
        out[name] = {"first": evals[0]["val_accuracy"], "last": evals[-1]["val_accuracy"],
                     "last_step": evals[-1]["step"]}
    return out


def render_sweep(sweep_file: str, grid: Dict[str, list], per_cell: Dict[str, Dict[str, Any]],
                 run: Dict[str, Any], provenance: str) -> str:
    """The sweep sentence (inline, inside the README's Sweeps item)."""
    axes = " x ".join(f"{k} {' / '.join(str(v) for v in vs)}" for k, vs in grid.items())
    cells = "; ".join(f"`{name}` {c['first']:.3f} -> {c['last']:.3f}"
                      for name, c in per_cell.items())
    steps = sorted({c["last_step"] for c in per_cell.values()})
    return (f"`{sweep_file}` ({len(per_cell)} cells: {axes}; {'/'.join(map(str, steps))} steps "
            f"of the tiny run each) took {fmt_duration(run['sweep_s'])} ({provenance}); run "
            f"again, it skipped all {run['skipped']} cells; `--collect` and `plot_sweep.py` "
            f"drew the curves. Validation pass@1 from step 0 to the last step: {cells}.")


# --------------------------------------------------------------------------------- measuring


def _machine() -> str:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    flags, model = set(), ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")) and not flags:
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    bf16 = "native bf16" if flags & {"avx512_bf16", "amx_bf16", "bf16"} else "no native bf16"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    name = f", {model}" if model else ""
    return f"{cpus} CPUs{name}, {bf16}, load average {load:.1f} at the start"


def _commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout
    head = git("rev-parse", "--short", "HEAD").strip() or "unknown commit"
    dirty = git("status", "--porcelain", "--untracked-files=no").strip()
    return head + (" with uncommitted changes" if dirty else "")


def _run(cmd: List[str], log: str, what: str) -> float:
    """Run cmd from the repository root, output to `log`; its wall time, or FiguresError."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    print(f"{what}: {shlex.join(cmd)}  (log: {log})", flush=True)
    start = time.time()
    with open(log, "a") as f:
        rc = subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    took = time.time() - start
    if rc != 0:
        with open(log) as f:
            tail = "".join(f.readlines()[-15:])
        raise FiguresError(f"{what} failed (exit {rc}) after {took:.0f} s; log {log}:\n{tail}")
    print(f"{what}: {fmt_duration(took)}", flush=True)
    return took


def _read_jsonl(path: str) -> List[Dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _fresh(out: str) -> None:
    if os.path.isdir(out) and os.listdir(out):
        if not os.path.exists(os.path.join(out, MARK)):
            raise FiguresError(f"--out {out}: not empty and not made by this script; "
                               "give another --out")
        shutil.rmtree(out)
    os.makedirs(out)
    open(os.path.join(out, MARK), "w").close()


def _yaml(path: str) -> Dict[str, Any]:
    import yaml

    with open(path) as f:
        return yaml.safe_load(f) or {}


def measure_demo(args, out: str) -> Dict[str, Any]:
    py = sys.executable
    run: Dict[str, Any] = {"warmup_s": None}
    base = os.path.abspath(args.base) if args.base else os.path.join(out, "tiny_base")
    if not args.base:
        run["warmup_s"] = _run([py, "tools/prepare_tiny.py", "--out", base,
                                *shlex.split(args.prepare_args)],
                               os.path.join(out, "prepare_tiny.log"), "warm-up")
    run_dir = os.path.join(out, "tiny")
    cmd = [py, "-m", "megatron_mgrpo.cli", "train", args.config, "--training.run_dir", run_dir,
           *base_overrides(base), "--logging.progress_bar", "false"]
    if args.steps:
        cmd += ["--training.steps", str(args.steps)]
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    run["train_s"] = _run(cmd, os.path.join(out, "logs", "train.log"), "demo run")
    cfg = _yaml(os.path.join(run_dir, "config.yaml"))
    run["eval_samples"] = cfg["training"]["eval_samples"]
    run["temperature"] = cfg["rollout"]["temperature"]
    mode = cfg["algorithm"]["mode"]
    run["method"] = {"mgrpo": "M-GRPO"}.get(mode, mode.upper())
    run["val_prompts"] = len(_read_jsonl(os.path.join(base, "data", "val.jsonl")))
    with open(os.path.join(base, "base_eval.json")) as f:
        base_eval = json.load(f)
    return {"figures": demo_figures(_read_jsonl(os.path.join(run_dir, "metrics.jsonl")),
                                    base_eval), "run": run, "base": base}


def base_overrides(base: str) -> List[str]:
    return ["--model.load", base, "--data.train_path", os.path.join(base, "data", "train.jsonl"),
            "--data.val_path", os.path.join(base, "data", "val.jsonl")]


def measure_sweep(args, out: str, base: str) -> Dict[str, Any]:
    import yaml

    sweep = _yaml(args.sweep)
    fixed = dict(sweep.get("fixed") or {})
    pairs = base_overrides(base)
    fixed.update({pairs[i][2:]: pairs[i + 1] for i in range(0, len(pairs), 2)})
    if args.sweep_steps:
        fixed["training.steps"] = args.sweep_steps
    base_run_dir = os.path.join(out, "sweep")
    copy = {**sweep, "base_run_dir": base_run_dir, "fixed": fixed}
    path = os.path.join(out, os.path.basename(args.sweep))
    with open(path, "w") as f:
        yaml.safe_dump(copy, f, sort_keys=False)
    py, log = sys.executable, os.path.join(out, "logs", "sweep.log")
    run = {"sweep_s": _run([py, "tools/sweep.py", path], log, "sweep")}
    _run([py, "tools/sweep.py", path], log, "sweep again")
    with open(log) as f:
        run["skipped"] = int(re.findall(r"sweep: \d+ ok, (\d+) skipped", f.read())[-1])
    _run([py, "tools/sweep.py", path, "--collect"], log, "sweep --collect")
    group = next(iter(sweep["grid"]))
    _run([py, "tools/plot_sweep.py", base_run_dir, "--group-by", group], log, "plot_sweep")
    with open(os.path.join(base_run_dir, "cells.json")) as f:  # name -> {run_dir, ...}
        cells = json.load(f)
    rows = {name: _read_jsonl(os.path.join(c["run_dir"], "metrics.jsonl"))
            for name, c in sorted(cells.items(), key=lambda kv: kv[1]["index"])}
    if run["skipped"] != len(rows):
        raise FiguresError(f"sweep: the second run skipped {run['skipped']} of {len(rows)} cells")
    return {"per_cell": sweep_figures(rows), "run": run, "grid": sweep["grid"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="examples/tiny/config.yaml", help="the demo's config")
    p.add_argument("--steps", type=int, default=0, help="training.steps (0: the config's)")
    p.add_argument("--out", default="runs/readme_figures", help="this script's run directory")
    p.add_argument("--base", default=None, help="reuse this warm-up base (not timed)")
    p.add_argument("--prepare-args", default="", help="extra tools/prepare_tiny.py arguments")
    p.add_argument("--sweep", default="examples/sweep_tiny.yaml", help="the README's sweep")
    p.add_argument("--no-sweep", action="store_true", help="leave the sweep block as it is")
    p.add_argument("--sweep-steps", type=int, default=0, help="training.steps of each cell "
                                                              "(0: the sweep file's)")
    p.add_argument("--readme", default="README.md", help="the file whose blocks are rewritten")
    p.add_argument("--no-write", action="store_true", help="print the blocks, keep the README")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "tools/readme_figures.py",
                          *(sys.argv[1:] if argv is None else argv)])
    os.chdir(REPO)  # relative paths (and the defaults) are from the repository root
    readme = os.path.abspath(args.readme)
    try:
        with open(readme) as f:
            text = f.read()
        for name in ["demo"] + ([] if args.no_sweep else ["sweep"]):
            replace_block(text, name, "")  # fail on a missing block before hours of work
        out = os.path.abspath(args.out)
        if args.base and os.path.abspath(args.base).startswith(out + os.sep):
            raise FiguresError(f"--base {args.base} lies inside --out {args.out}, which is "
                               "emptied first; copy it elsewhere or give another --out")
        _fresh(out)
        machine, commit = _machine(), _commit()
        date = datetime.date.today().isoformat()
        provenance = f"`{command}` at {commit}, {date}, on {machine}"
        demo = measure_demo(args, out)
        blocks = {"demo": render_demo(demo["figures"], demo["run"], provenance)}
        if not args.no_sweep:
            s = measure_sweep(args, out, demo["base"])
            blocks["sweep"] = render_sweep(args.sweep, s["grid"], s["per_cell"], s["run"],
                                           f"at {commit}, {date}")
        for name, body in blocks.items():
            text = replace_block(text, name, body)
    except (FiguresError, OSError) as e:
        print(f"readme_figures: {e}", file=sys.stderr)
        return 1
    with open(os.path.join(out, "blocks.json"), "w") as f:
        json.dump({"command": command, "commit": commit, "date": date, "blocks": blocks,
                   "demo": demo}, f, indent=2)
    if args.no_write:
        print("\n\n".join(f"<!-- figures:{n} -->\n{b}\n<!-- /figures:{n} -->"
                          for n, b in blocks.items()))
    else:
        with open(readme, "w") as f:
            f.write(text)
        print(f"readme_figures: rewrote {', '.join(blocks)} in {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
