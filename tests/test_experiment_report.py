"""tools/experiment_report.py: --gather keeps the listed keys, the tables' numbers against
hand-computed means, sample stds and collapse steps on scripted curves, the figures, and its
one-line errors. Hand-written metrics; no training."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from tests import DEADLOCK_GUARD_S

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "tools" / "experiment_report.py"

SWEEP = """\
config: cfg.yaml
base_run_dir: {base}
arms:
  srt_a: {{algorithm.mode: srt}}
  mom_b: {{algorithm.mode: mgrpo, algorithm.iqr_filter: true}}
  never: {{algorithm.mode: rlvr}}
grid: {{training.seed: [1, 2]}}
fixed: {{training.steps: 100}}
report:
  title: Scripted
  out: {out}
  columns: {{SRT: srt_a, M-GRPO: mom_b, RLVR: never}}
"""

# Validation pass@1 every 20 steps. srt_a seed 1 peaks at 0.6 (step 20) and stays below
# 0.6 - 0.05 from step 40 on (collapse step 40); seed 2 dips only twice (no collapse).
VAL = {
    ("srt_a", 1): [0.4, 0.6, 0.5, 0.52, 0.3, 0.2],
    ("srt_a", 2): [0.4, 0.5, 0.44, 0.5, 0.44, 0.5],
    ("mom_b", 1): [0.4, 0.45, 0.5, 0.55, 0.6, 0.62],
    ("mom_b", 2): [0.4, 0.5, 0.5, 0.5, 0.55, 0.56],
}


def _rows(arm, seed):
    rows = []
    for step in range(101):
        row = {"step": step, "reward_mean": 0.5 + 0.001 * step, "vote_agreement": 0.9,
               "entropy_mean": 0.2 if arm == "mom_b" else 0.05, "entropy_q1": 0.1,
               "entropy_median": 0.15, "entropy_q3": 0.2, "pseudo_label_acc": 0.75,
               "iqr_dropped_frac": 0.1 if arm == "mom_b" else 0.0, "grad_norm": 1.0,
               "generate_policy_time_s": 3.0, "alarm_entropy_mean": 0.0}
        if step % 20 == 0:
            row["val_accuracy"] = VAL[(arm, seed)][step // 20]
            row["val_maj"] = 0.5
        if step == 0:
            row = {k: row[k] for k in ("step", "val_accuracy", "val_maj")}
        rows.append(row)
    return rows


def _std(values):
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


@pytest.fixture
def experiment(tmp_path):
    base, out = tmp_path / "runs", tmp_path / "report.md"
    (tmp_path / "exp.yaml").write_text(SWEEP.format(base=base, out=out))
    for (arm, seed) in VAL:
        d = base / f"{arm},training.seed={seed}"
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(arm, seed)))
    (base / "cell_times.jsonl").write_text("".join(
        json.dumps({"cell": f"{arm},training.seed={seed}", "seconds": s, "exit": 0}) + "\n"
        for (arm, seed), s in zip(VAL, (100.0, 120.0, 200.0, 220.0))))
    return tmp_path


def _run(*args, cwd):
    return subprocess.run([sys.executable, str(REPORT), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=DEADLOCK_GUARD_S)


def _table_row(text, first_cell):
    """The row of the widest table that starts with first_cell."""
    line = max((ln for ln in text.splitlines() if ln.startswith(f"| {first_cell} |")),
               key=lambda ln: ln.count("|"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_report_numbers_figures_and_gather(experiment):
    sweep, raw = experiment / "exp.yaml", experiment / "raw"
    r = _run(sweep, "--raw-dir", raw, cwd=experiment)
    assert r.returncode == 2 and "no raw metrics" in r.stderr and r.stderr.count("\n") == 1
    r = _run(sweep, "--gather", "--raw-dir", raw, cwd=experiment)
    assert r.returncode == 0, r.stderr
    assert "gathered 4 of 6 cells" in r.stdout
    kept = [json.loads(ln) for ln in (raw / "srt_a,training.seed=1.metrics.jsonl")
            .read_text().splitlines()]
    assert len(kept) == 101 and "generate_policy_time_s" not in kept[5]
    assert "alarm_entropy_mean" not in kept[5]  # a 0 alarm is not kept; the rest is
    assert kept[5]["grad_norm"] == 1.0 and kept[20]["val_accuracy"] == 0.6
    for png in ("val_accuracy", "reward_mean", "entropy_quartiles", "iqr_dropped_frac"):
        assert (raw / f"{png}.png").stat().st_size > 2000, png
    text = (experiment / "report.md").read_text()
    assert text.startswith("# Scripted\n")
    # Paper table: original, SRT-best, SRT-final, M-GRPO-final, RLVR-final (never ran).
    row = _table_row(text, "validation pass@1")
    assert row[1:] == ["0.400 +- 0.000", f"0.550 +- {_std([0.6, 0.5]):.3f}",
                       f"0.350 +- {_std([0.2, 0.5]):.3f}",
                       f"0.590 +- {_std([0.62, 0.56]):.3f}", "-"]
    row = _table_row(text, "srt_a")
    assert row[1:8] == [f"0.550 +- {_std([0.6, 0.5]):.3f}", "20, 20",
                        f"0.350 +- {_std([0.2, 0.5]):.3f}",
                        f"-0.200 +- {_std([-0.4, 0.0]):.3f}", "0.500 +- 0.000", "40, -",
                        "0.050 +- 0.000"]
    row = _table_row(text, "mom_b")
    assert row[2] == "100, 100" and row[6] == "-, -" and row[7] == "0.200 +- 0.000"
    assert "| never |" not in text and "| srt_a | 110 +- 14 |" in text
    assert f"All cells: {640 / 3600:.2f} h" in text
    # Rebuilt from the committed copy alone: the run dirs may be gone.
    for d in (experiment / "runs").iterdir():
        if d.is_dir():
            for f in d.iterdir():
                f.unlink()
    assert _run(sweep, "--raw-dir", raw, cwd=experiment).returncode == 0
    assert (experiment / "report.md").read_text() == text


def test_unknown_column_arm_is_one_line(experiment):
    text = (experiment / "exp.yaml").read_text().replace("RLVR: never", "RLVR: nope")
    (experiment / "exp.yaml").write_text(text)
    r = _run("exp.yaml", cwd=experiment)
    assert r.returncode == 2 and r.stderr == \
        "experiment_report: report.columns.RLVR: no arm 'nope' in the sweep\n"
