"""Generation beside training (`rollout.overlap`): none vs momentum vs full on the same work.

    python benchmarks/overlap.py [--base runs/tiny_base] [--steps 40] [--eval-interval 10]
        [--prompts 16] [--modes none,momentum,full] [--out runs/bench_overlap]
        [--placement separate|swap] [--plot docs/overlap_curves.png]

One invocation trains the tiny task (`make train` builds runs/tiny_base) once per mode, the
same steps, prompts, seeds and tokens: M-GRPO, 6 policy + 2 momentum completions per prompt,
`--prompts` prompts a step, fp32, `algorithm.tis_cap 2` in every mode (so the objective is the
same; in `none` nothing is stale and the weight is ~1). The engine is launched `mgrpo serve`
processes (the embedded engine behind SGLang's HTTP API): with `--placement separate` (the
default, a cluster's layout) one server per weight set, with `swap` one server that loads the
policy and the momentum weights in turn. Threads: OMP_NUM_THREADS=1 for the trainer and for
each server.

Figures (one JSON object per line, names prefixed `overlap.`):
  step_time_<mode>            median step seconds over steps 3.. (validation steps left out)
  step_time_ratio_<mode>      that over `none`'s (goal < 1: the overlap pays)
  generation_share_none       generation (policy + momentum) over the step, sequential
  engine_idle_share_none      engine_wait_time_s over the step, sequential: the share of a
                              step a rollout node would idle, what overlap can hide at best
  trainer_idle_share_<mode>   trainer_wait_time_s over the step
  val_accuracy_<mode>         the last validation pass@1 (the learning curves: --plot)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_mode(mode: str, args) -> List[Dict]:
    run_dir = os.path.join(args.out, mode)
    serve = (f"{sys.executable} -m megatron_mgrpo.cli serve --model {{model}} --port {{port}}")
    cmd = [sys.executable, "-m", "megatron_mgrpo.cli", "train",
           os.path.join(REPO, "examples/tiny/config.yaml"),
           "--model.load", args.base,
           "--data.train_path", f"{args.base}/data/train.jsonl",
           "--data.val_path", f"{args.base}/data/val.jsonl",
           "--training.run_dir", run_dir, "--training.overwrite", "true",
           "--training.steps", str(args.steps), "--training.eval_interval",
           str(args.eval_interval), "--training.max_eval_prompts", "100",
           "--training.save_interval", "0", "--logging.progress_bar", "false",
           "--data.prompts_per_step", str(args.prompts),
           "--algorithm.tis_cap", "2", "--rollout.overlap", mode,
           "--rollout.backend", "sglang", "--sglang.launch", "1",
           "--sglang.launch_command", serve, "--sglang.placement", args.placement]
    env = dict(os.environ, OMP_NUM_THREADS="1", MGRPO_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    with open(os.path.join(args.out, f"{mode}.log"), "w") as log:
        log.write(shlex.join(cmd) + "\n")
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if rc != 0:
        raise SystemExit(f"overlap.py: mode {mode} failed (exit {rc}); see "
                         f"{os.path.join(args.out, mode + '.log')}")
    print(f"# {mode}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def median(rows: List[Dict], key: str) -> float:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else float("nan")


def plot(curves: Dict[str, List[Dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode, rows in curves.items():
        val = [(r["step"], r["val_accuracy"]) for r in rows if "val_accuracy" in r]
        axes[0].plot(*zip(*val), marker=".", label=mode)
        steps = [r for r in rows if r.get("step", 0) > 0 and "reward_mean" in r]
        axes[1].plot([r["step"] for r in steps], [r["reward_mean"] for r in steps], label=mode)
    axes[0].set_title("validation pass@1")
    axes[1].set_title("reward (vote agreement)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default=os.path.join(REPO, "runs/tiny_base"))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eval-interval", type=int, default=10)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--modes", default="none,momentum,full")
    p.add_argument("--out", default=os.path.join(REPO, "runs/bench_overlap"))
    p.add_argument("--placement", default="separate", choices=("separate", "swap"))
    p.add_argument("--plot", default=None, help="PNG of the learning curves side by side")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.base, "model.safetensors")):
        print(f"overlap.py: no base at {args.base} (`make train` builds runs/tiny_base)",
              file=sys.stderr)
        return 2
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    curves = {m: run_mode(m, args) for m in modes}
    timed = {m: [r for r in rows if r.get("step", 0) >= 3 and "val_accuracy" not in r]
             for m, rows in curves.items()}
    out = []
    for m in modes:
        out.append({"name": f"overlap.step_time_{m}", "value": round(median(timed[m],
                    "step_time_s"), 3), "unit": "s", "steps": len(timed[m])})
    if "none" in timed:
        base = median(timed["none"], "step_time_s")
        for m in modes:
            if m != "none":
                out.append({"name": f"overlap.step_time_ratio_{m}",
                            "value": round(median(timed[m], "step_time_s") / base, 3),
                            "unit": "x", "goal": "< 1"})
        gen = [r.get("generate_policy_time_s", 0) + r.get("generate_momentum_time_s", 0)
               for r in timed["none"]]
        out.append({"name": "overlap.generation_share_none",
                    "value": round(statistics.median(gen) / base, 3), "unit": "fraction"})
        out.append({"name": "overlap.engine_idle_share_none",
                    "value": round(median(timed["none"], "engine_wait_time_s") / base, 3),
                    "unit": "fraction"})
    for m in modes:
        out.append({"name": f"overlap.trainer_idle_share_{m}",
                    "value": round(median(timed[m], "trainer_wait_time_s")
                                   / median(timed[m], "step_time_s"), 3), "unit": "fraction"})
        val = [r["val_accuracy"] for r in curves[m] if "val_accuracy" in r]
        out.append({"name": f"overlap.val_accuracy_{m}", "value": round(val[-1], 4),
                    "unit": "pass@1", "curve": [round(v, 4) for v in val]})
    for line in out:
        print(json.dumps(line))
    if args.plot:
        plot(curves, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
