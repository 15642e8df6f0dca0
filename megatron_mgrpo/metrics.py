"""What a run reports: `metrics.jsonl` (one JSON object per step), TensorBoard events beside it,
a progress bar, and PNG plots of the curves at the end. Rank 0 writes; other ranks no-op.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str) -> List[Dict]:
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLogger:
    """Appends per-step metrics; on resume keeps only the steps up to the checkpoint."""

    def __init__(self, run_dir: str, total_steps: int, start_step: int = 0, enabled: bool = True,
                 tensorboard: bool = True, progress_bar: bool = True):
        self.enabled = enabled
        self.run_dir = run_dir
        self._tb = None
        self._bar = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, METRICS_FILE)
        # A resumed run keeps the rows up to its checkpoint (the steps after it are about to
        # be redone); a fresh one keeps none (its step 0 is about to be logged again).
        kept = ([m for m in read_metrics(run_dir) if m.get("step", 0) <= start_step]
                if start_step > 0 else [])
        with open(path, "w") as f:
            for m in kept:
                f.write(json.dumps(m) + "\n")
        self._file = open(path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"),
                                         purge_step=start_step + 1)
            except ImportError:  # tensorboard not installed: the jsonl still has everything
                self._tb = None
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step",
                             dynamic_ncols=True)

    def log(self, metrics: Dict[str, float], advance: bool = True) -> None:
        if not self.enabled:
            return
        step = int(metrics["step"])
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in metrics.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if self._bar is not None:
            shown = {k: f"{metrics[k]:.3f}" for k in ("reward_mean", "entropy_mean",
                                                      "val_accuracy") if k in metrics}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(1 if advance else 0)

    def write(self, line: str) -> None:
        """A line of text that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()


PLOTS = {
    "reward.png": ("reward", [("reward_mean", "reward (agreement with the pseudo-label)")]),
    "entropy.png": ("trajectory entropy", [("entropy_q1", "Q1"), ("entropy_median", "median"),
                                           ("entropy_mean", "mean"), ("entropy_q3", "Q3"),
                                           ("entropy_fence", "IQR fence")]),
    "pseudo_label_acc.png": ("pseudo-label accuracy", [("pseudo_label_acc", "pseudo-label acc"),
                                                       ("vote_agreement", "vote agreement")]),
    "val_accuracy.png": ("validation", [("val_accuracy", "pass@1"), ("val_maj", "maj@k")]),
    "collapse.png": ("signs of collapse", [
        ("vote_agreement", "vote agreement"), ("vote_margin", "vote margin"),
        ("all_identical_frac", "all G identical"),
        ("policy_momentum_agreement", "policy = momentum majority")]),
    "distinct_answers.png": ("answers", [("distinct_answers", "distinct answers per prompt")]),
    "time.png": ("seconds per step", [
        ("step_time_s", "step"), ("generate_policy_time_s", "generate (policy)"),
        ("generate_momentum_time_s", "generate (momentum)"), ("logprob_time_s", "log-probs"),
        ("reference_time_s", "reference"), ("train_time_s", "train"), ("push_time_s", "push"),
        ("overlap_wait_time_s", "wait for the generation ahead")]),
}


def plot_metrics(run_dir: str) -> List[str]:
    """Draw the run's curves as PNGs in run_dir; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    written = []
    # Benchmark curves (eval.interval): one line per `<benchmark>/pass@1` logged.
    bench = sorted({k for m in rows for k in m if k.endswith("/pass@1")})
    plots = dict(PLOTS, **{"benchmarks.png": ("benchmarks (pass@1)",
                                              [(k, k.split("/")[0]) for k in bench])})
    for name, (title, series) in plots.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        drawn = False
        for key, label in series:
            pts = [(m["step"], m[key]) for m in rows if m.get(key) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=label)
                drawn = True
        if drawn and name == "val_accuracy.png":
            for step in {m["collapse_step"] for m in rows if m.get("collapse_step") is not None}:
                ax.axvline(step, color="red", ls="--", lw=1, label=f"collapse (step {step})")
        if drawn:
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = os.path.join(run_dir, name)
            fig.savefig(path, dpi=100)
            written.append(path)
        plt.close(fig)
    return written
