"""tools/sweep.py and tools/plot_sweep.py: sweep-file checks, cell names and the cartesian
product, --dry-run, the slurm array script, --local with a stand-in trainer (failures, skips,
resume), --collect and the plots on hand-written metrics. CPU only, no training.
"""

import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tests import DEADLOCK_GUARD_S

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "tools" / "sweep.py"
PLOT = REPO / "tools" / "plot_sweep.py"
LAUNCHER = REPO / "slurm" / "mgrpo_8b.sh"

SWEEP_YAML = """\
config: cfg.yaml
base_run_dir: runs/sw
grid:
  rollout.num_momentum_rollouts: [0, 2]
  algorithm.mode: [mgrpo, srt]
  training.seed: [1, 2]
fixed: {training.steps: 3}
"""

# Hand-listed: first grid key slowest; names sort their keys.
EXPECTED = [
    ("algorithm.mode=mgrpo,rollout.num_momentum_rollouts=0,training.seed=1", 0, "mgrpo", 1),
    ("algorithm.mode=mgrpo,rollout.num_momentum_rollouts=0,training.seed=2", 0, "mgrpo", 2),
    ("algorithm.mode=srt,rollout.num_momentum_rollouts=0,training.seed=1", 0, "srt", 1),
    ("algorithm.mode=srt,rollout.num_momentum_rollouts=0,training.seed=2", 0, "srt", 2),
    ("algorithm.mode=mgrpo,rollout.num_momentum_rollouts=2,training.seed=1", 2, "mgrpo", 1),
    ("algorithm.mode=mgrpo,rollout.num_momentum_rollouts=2,training.seed=2", 2, "mgrpo", 2),
    ("algorithm.mode=srt,rollout.num_momentum_rollouts=2,training.seed=1", 2, "srt", 1),
    ("algorithm.mode=srt,rollout.num_momentum_rollouts=2,training.seed=2", 2, "srt", 2),
]

# A stand-in for `mgrpo train`: CONFIG --training.run_dir DIR --key value ... Writes one
# metrics line per step up to training.steps (from a step given by --training.resume's
# metrics), records its argv, and fails when the mode is srt with seed 2.
FAKE_TRAIN = """\
import json, os, sys
args = sys.argv[1:]
opts = dict(zip(args[1::2], args[2::2]))
run_dir = opts["--training.run_dir"]
os.makedirs(run_dir, exist_ok=True)
with open(os.path.join(run_dir, "argv.json"), "a") as f:
    f.write(json.dumps(args) + "\\n")
print("training", run_dir)
if opts.get("--algorithm.mode") == "srt" and opts.get("--training.seed") == "2":
    print("boom", file=sys.stderr)
    sys.exit(1)
with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
    for step in range(int(opts["--training.steps"]) + 1):
        f.write(json.dumps({"step": step, "reward_mean": 0.1 * step}) + "\\n")
"""


def _run(tool, *args, cwd):
    return subprocess.run([sys.executable, str(tool), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=DEADLOCK_GUARD_S)


@pytest.fixture
def sweep_dir(tmp_path):
    (tmp_path / "sweep.yaml").write_text(SWEEP_YAML)
    (tmp_path / "cfg.yaml").write_text("training:\n  steps: 60\n")
    return tmp_path


@pytest.mark.parametrize("text, message", [
    ("base_run_dir: x\ngrid: {training.seed: [1]}\n", "missing config"),
    ("config: c.yaml\ngrid: {}\n", "empty grid"),
    ("config: c.yaml\n", "empty grid"),
    ("config: c.yaml\ngrid: {training.seed: 1}\n", "must be a non-empty list"),
    ("config: c.yaml\ngrid: {training.seed: []}\n", "must be a non-empty list"),
    ("config: c.yaml\ngrid: {training.seed: [1]}\nsteps: 3\n", "unknown top-level key(s) steps"),
    ("config: c.yaml\ngrid: {seed: [1]}\n", "not a dotted config key"),
    ("config: c.yaml\ngrid: {training.run_dir: [a, b]}\n", "set per cell by the sweep"),
    ("config: c.yaml\ngrid: {training.seed: [1]}\nfixed: {training.seed: 2}\n",
     "in both grid and fixed"),
    ("config: c.yaml\ngrid: {training.seed: [1, 1]}\n", "both named"),
    ("- just a list\n", "expected a mapping"),
    ("config: [unclosed\n", "not YAML/JSON"),
    ("config: c.yaml\narms: [a, b]\n", "arms must be a mapping"),
    ("config: c.yaml\narms: {}\n", "empty grid"),
    ("config: c.yaml\narms: {a b: {algorithm.mode: srt}}\n", "arm name 'a b'"),
    ("config: c.yaml\narms: {a: [1]}\n", "arms.a must be a mapping"),
    ("config: c.yaml\narms: {a: {seed: 1}}\n", "not a dotted config key"),
    ("config: c.yaml\narms: {a: {training.seed: 1}}\ngrid: {training.seed: [1]}\n",
     "training.seed is in both arms.a and grid"),
    ("config: c.yaml\narms: {a: {training.seed: 1}}\nfixed: {training.seed: 1}\n",
     "training.seed is in both arms.a and fixed"),
])
def test_malformed_sweep_file_is_one_line_exit_2(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    r = _run(SWEEP, "bad.yaml", "--dry-run", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and r.stderr.count("\n") == 1 and r.stdout == ""


def test_max_cells_guard(sweep_dir):
    r = _run(SWEEP, "sweep.yaml", "--dry-run", "--max-cells", "7", cwd=sweep_dir)
    assert r.returncode == 2 and "8 cells is more than --max-cells 7" in r.stderr


def test_dry_run_lists_the_product_and_writes_nothing(sweep_dir):
    r = _run(SWEEP, "sweep.yaml", "--dry-run", "--command", "train-it", cwd=sweep_dir)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:8] == [
        f"train-it cfg.yaml --training.run_dir runs/sw/{name} "
        f"--rollout.num_momentum_rollouts {n} --algorithm.mode {mode} --training.seed {seed} "
        f"--training.steps 3" for name, n, mode, seed in EXPECTED]
    manifest = json.loads("\n".join(lines[8:]))
    assert list(manifest) == [e[0] for e in EXPECTED]
    name, n, mode, seed = EXPECTED[6]
    assert manifest[name] == {
        "index": 6, "run_dir": f"runs/sw/{name}",
        "values": {"rollout.num_momentum_rollouts": n, "algorithm.mode": mode,
                   "training.seed": seed},
        "overrides": {"rollout.num_momentum_rollouts": n, "algorithm.mode": mode,
                      "training.seed": seed, "training.steps": 3}}
    assert sorted(os.listdir(sweep_dir)) == ["cfg.yaml", "sweep.yaml"]


def test_names_are_filesystem_safe_and_values_round_trip(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({
        "config": "c.yaml", "base_run_dir": "out",
        "grid": {"eval.benchmarks": [["math500", "aime24"]], "model.load": ["/m/a b"],
                 "algorithm.iqr_filter": [True], "training.stop_file": [None, "1"]}}))
    r = _run(SWEEP, "s.json", "--dry-run", "--command", "t", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    manifest = json.loads(r.stdout[r.stdout.index("{"):])
    assert list(manifest) == [
        "algorithm.iqr_filter=true,eval.benchmarks=_math500,_aime24_,model.load=_m_a_b,"
        "training.stop_file=null",
        "algorithm.iqr_filter=true,eval.benchmarks=_math500,_aime24_,model.load=_m_a_b,"
        "training.stop_file=_1_"]
    # The command line carries the values as YAML the config loader reads back exactly.
    from megatron_mgrpo.config import load_config

    for line, name, stop_file in zip(r.stdout.splitlines()[:2], manifest, (None, "1")):
        args = shlex.split(line)
        assert args[:4] == ["t", "c.yaml", "--training.run_dir", f"out/{name}"]
        cfg = load_config(None, args[4:], validate=False)
        assert cfg.eval.benchmarks == ["math500", "aime24"] and cfg.model.load == "/m/a b"
        assert cfg.algorithm.iqr_filter is True and cfg.training.stop_file == stop_file


ARMS_YAML = """\
config: cfg.yaml
base_run_dir: runs/arms
arms:
  srt_g4: {algorithm.mode: srt, rollout.num_policy_rollouts: 4}
  mgrpo_m0.9: {algorithm.mode: mgrpo, algorithm.momentum: 0.9}
grid: {training.seed: [1, 2]}
fixed: {training.steps: 3}
"""


def test_arms_cross_the_grid(tmp_path):
    (tmp_path / "a.yaml").write_text(ARMS_YAML)
    r = _run(SWEEP, "a.yaml", "--dry-run", "--command", "t", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    names = ["srt_g4,training.seed=1", "srt_g4,training.seed=2",
             "mgrpo_m0.9,training.seed=1", "mgrpo_m0.9,training.seed=2"]
    assert lines[:4] == [
        "t cfg.yaml --training.run_dir runs/arms/srt_g4,training.seed=1 --algorithm.mode srt "
        "--rollout.num_policy_rollouts 4 --training.seed 1 --training.steps 3",
        "t cfg.yaml --training.run_dir runs/arms/srt_g4,training.seed=2 --algorithm.mode srt "
        "--rollout.num_policy_rollouts 4 --training.seed 2 --training.steps 3",
        "t cfg.yaml --training.run_dir runs/arms/mgrpo_m0.9,training.seed=1 "
        "--algorithm.mode mgrpo --algorithm.momentum 0.9 --training.seed 1 --training.steps 3",
        "t cfg.yaml --training.run_dir runs/arms/mgrpo_m0.9,training.seed=2 "
        "--algorithm.mode mgrpo --algorithm.momentum 0.9 --training.seed 2 --training.steps 3"]
    manifest = json.loads("\n".join(lines[4:]))
    assert list(manifest) == names
    assert manifest[names[2]]["values"] == {"arm": "mgrpo_m0.9", "training.seed": 1}
    # Arms alone (no grid): one cell per arm, named by it.
    (tmp_path / "b.yaml").write_text("config: c.yaml\narms: {x: {training.seed: 1}, y: {}}\n")
    r = _run(SWEEP, "b.yaml", "--dry-run", "--command", "t", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[:2] == ["t c.yaml --training.run_dir runs/b/x --training.seed 1",
                                         "t c.yaml --training.run_dir runs/b/y"]


def test_jobs_runs_cells_side_by_side_and_collects_by_arm(tmp_path):
    """--jobs 2: both cells of a pair run at once (each waits until it sees the other's
    marker), their times go to cell_times.jsonl, and summary.csv has an arm column."""
    (tmp_path / "a.yaml").write_text(ARMS_YAML)
    (tmp_path / "cfg.yaml").write_text("training:\n  steps: 3\n")
    (tmp_path / "pair_train.py").write_text(FAKE_TRAIN.replace(
        'print("training", run_dir)', textwrap.dedent("""\
        import glob, time
        open(os.path.join(run_dir, "started"), "w").close()
        deadline = time.time() + 60
        while len(glob.glob(os.path.join(os.path.dirname(run_dir), "*", "started"))) < 2:
            assert time.time() < deadline, "the other cell never started"
            time.sleep(0.05)
        print("threads", os.environ.get("OMP_NUM_THREADS"))""")))
    env_cmd = f"{sys.executable} pair_train.py"
    r = subprocess.run([sys.executable, str(SWEEP), "a.yaml", "--jobs", "2", "--max-cells", "2",
                        "--command", env_cmd], cwd=tmp_path, capture_output=True, text=True,
                       timeout=DEADLOCK_GUARD_S)
    assert r.returncode == 2 and "4 cells is more than --max-cells 2" in r.stderr
    (tmp_path / "a.yaml").write_text(ARMS_YAML.replace("[1, 2]", "[1]"))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    r = subprocess.run([sys.executable, str(SWEEP), "a.yaml", "--jobs", "2", "--command",
                        env_cmd], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=DEADLOCK_GUARD_S)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sweep: 2 ok, 0 skipped, 0 failed of 2 cells" in r.stdout
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    for name in ("srt_g4,training.seed=1", "mgrpo_m0.9,training.seed=1"):
        assert f"threads {threads}" in (tmp_path / "runs/arms" / name / "sweep.log").read_text()
    times = [json.loads(line) for line in
             (tmp_path / "runs/arms/cell_times.jsonl").read_text().splitlines()]
    assert sorted(t["cell"] for t in times) == ["mgrpo_m0.9,training.seed=1",
                                                 "srt_g4,training.seed=1"]
    assert all(t["exit"] == 0 and t["jobs"] == 2 and t["seconds"] >= 0 for t in times)
    assert _run(SWEEP, "a.yaml", "--collect", cwd=tmp_path).returncode == 0
    with open(tmp_path / "runs/arms/summary.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][:3] == ["arm", "training.seed", "name"]
    assert [r[:4] for r in rows[1:]] == [["srt_g4", "1", "srt_g4,training.seed=1", "3"],
                                         ["mgrpo_m0.9", "1", "mgrpo_m0.9,training.seed=1", "3"]]


def test_slurm_array_script(sweep_dir):
    r = _run(SWEEP, "sweep.yaml", "--slurm", LAUNCHER, cwd=sweep_dir)
    assert r.returncode == 0, r.stderr
    script = sweep_dir / "runs/sw/sweep_array.sh"
    assert f"sbatch {'runs/sw/sweep_array.sh'}" in r.stdout.splitlines()
    text = script.read_text()
    assert "#SBATCH --array=0-7\n" in text
    launcher = [ln for ln in LAUNCHER.read_text().splitlines() if ln.startswith("#SBATCH")]
    assert [ln for ln in launcher if "--output" not in ln] == \
        [ln for ln in text.splitlines() if ln.startswith("#SBATCH")][:-2]  # + array, output
    assert text.count("#SBATCH --output") == 1 and "%A_%a" in text
    assert (sweep_dir / "runs/sw/cells.json").exists()
    # Run it as task 5 with a stub launcher in place of the real one: it gets cell 5.
    stub = sweep_dir / "launcher.sh"
    stub.write_text('#!/bin/bash\necho "CONFIG=$CONFIG RUN_DIR=$RUN_DIR ARGS=$*"\n')
    text = text.replace(str(LAUNCHER), str(stub))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SLURM_ARRAY_TASK_ID": "5",
           "SLURM_SUBMIT_DIR": str(sweep_dir)}
    out = subprocess.run(["bash", "-c", text], env=env, capture_output=True, text=True)
    name, n, mode, seed = EXPECTED[5]
    assert out.stdout.splitlines()[-1] == (
        f"CONFIG=cfg.yaml RUN_DIR=runs/sw/{name} ARGS=-- --rollout.num_momentum_rollouts {n} "
        f"--algorithm.mode {mode} --training.seed {seed} --training.steps 3"), out.stderr
    env["SLURM_ARRAY_TASK_ID"] = "8"
    out = subprocess.run(["bash", "-c", text], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "no cell 8" in out.stderr
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path="/tmp/venv/bin")
    if shellcheck:
        sc = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
        assert sc.returncode == 0, sc.stdout


def test_local_runs_reports_failures_skips_and_resumes(sweep_dir):
    (sweep_dir / "fake_train.py").write_text(FAKE_TRAIN)
    command = f"{sys.executable} fake_train.py"
    r = _run(SWEEP, "sweep.yaml", "--command", command, cwd=sweep_dir)
    assert r.returncode == 1
    failed = [name for name, _, mode, seed in EXPECTED if (mode, seed) == ("srt", 2)]
    assert "sweep: 6 ok, 0 skipped, 2 failed of 8 cells" in r.stdout
    for name in failed:  # reported with exit code and log; the log has the cell's stderr
        log = f"runs/sw/{name}/sweep.log"
        assert f"failed {name}: exit 1, log: {log}" in r.stdout
        assert "boom" in (sweep_dir / log).read_text()
    assert r.stdout.count(": ok (") == 6 and "[8/8]" in r.stdout  # went on past the failures
    ok = sweep_dir / "runs/sw" / EXPECTED[0][0]
    assert "training runs/sw/" in (ok / "sweep.log").read_text()
    assert json.loads((ok / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    # An interrupted cell: metrics short of training.steps -> rerun with --training.resume.
    short = sweep_dir / "runs/sw" / EXPECTED[1][0]
    (short / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n')
    r = _run(SWEEP, "sweep.yaml", "--command", command, cwd=sweep_dir)
    assert r.returncode == 1
    assert "sweep: 1 ok, 5 skipped, 2 failed of 8 cells" in r.stdout
    assert f"{EXPECTED[0][0]}: skipped (finished at step 3)" in r.stdout
    assert len((ok / "argv.json").read_text().splitlines()) == 1  # not run again
    argv = [json.loads(line) for line in (short / "argv.json").read_text().splitlines()]
    assert "--training.resume" not in argv[0] and argv[1][-2:] == ["--training.resume", "true"]


def _fake_run(run_dir: Path, rows):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def collected(tmp_path):
    """A 2x2 sweep (mode x seed) with hand-written metrics; one cell never ran."""
    (tmp_path / "sweep.yaml").write_text(
        "config: cfg.yaml\nbase_run_dir: out\n"
        "grid: {algorithm.mode: [mgrpo, srt], training.seed: [1, 2]}\n")
    assert _run(SWEEP, "sweep.yaml", "--slurm", LAUNCHER, cwd=tmp_path).returncode == 0
    out = tmp_path / "out"
    _fake_run(out / "algorithm.mode=mgrpo,training.seed=1", [
        {"step": 0, "val_accuracy": 0.30, "math500/pass@1": 0.20},
        {"step": 1, "reward_mean": 0.5, "entropy_mean": 1.2},
        {"step": 2, "reward_mean": 0.6, "entropy_mean": 1.1, "val_accuracy": 0.50,
         "math500/pass@1": 0.40, "aime24/pass@1": 0.10},
        {"step": 3, "reward_mean": 0.7, "entropy_mean": 1.0},
        {"step": 4, "reward_mean": 0.8, "entropy_mean": None, "val_accuracy": 0.45}])
    _fake_run(out / "algorithm.mode=mgrpo,training.seed=2", [
        {"step": 0, "val_accuracy": 0.30},
        {"step": 1, "reward_mean": 0.4, "entropy_mean": 1.3},
        {"step": 2, "reward_mean": 0.5, "entropy_mean": 1.2, "val_accuracy": 0.35,
         "collapse_step": 2}])
    _fake_run(out / "algorithm.mode=srt,training.seed=1", [
        {"step": 0, "val_accuracy": 0.30},
        {"step": 1, "reward_mean": 0.9, "entropy_mean": 0.4},
        {"step": 2, "reward_mean": 1.0, "entropy_mean": 0.1, "val_accuracy": 0.20}])
    return tmp_path


def test_collect_summary_csv(collected):
    r = _run(SWEEP, "sweep.yaml", "--collect", cwd=collected)
    assert r.returncode == 0, r.stderr
    assert "4 cells, 3 with metrics" in r.stdout
    with open(collected / "out/summary.csv") as f:
        rows = list(csv.reader(f))
    assert rows == [
        ["algorithm.mode", "training.seed", "name", "last_step", "val_accuracy_final",
         "val_accuracy_best", "reward_mean_final", "entropy_mean_final", "collapse_step",
         "aime24/pass@1", "math500/pass@1"],
        ["mgrpo", "1", "algorithm.mode=mgrpo,training.seed=1", "4", "0.45", "0.5", "0.8",
         "1.0", "", "0.1", "0.4"],
        ["mgrpo", "2", "algorithm.mode=mgrpo,training.seed=2", "2", "0.35", "0.35", "0.5",
         "1.2", "2", "", ""],
        ["srt", "1", "algorithm.mode=srt,training.seed=1", "2", "0.2", "0.3", "1.0", "0.1",
         "", "", ""],
        ["srt", "2", "algorithm.mode=srt,training.seed=2", "", "", "", "", "", "", "", ""]]


def test_plot_sweep_per_cell_and_grouped(collected):
    out = collected / "out"
    r = _run(PLOT, "out", cwd=collected)
    assert r.returncode == 0, r.stderr
    pngs = ["sweep_reward_mean.png", "sweep_entropy_mean.png", "sweep_val_accuracy.png"]
    for png in pngs:
        assert (out / png).stat().st_size > 1000
        (out / png).unlink()
    r = _run(PLOT, "out", "--group-by", "algorithm.mode", "--metrics",
             "reward_mean,math500/pass@1,nowhere", cwd=collected)
    assert r.returncode == 0, r.stderr
    assert (out / "sweep_reward_mean.png").stat().st_size > 1000
    assert (out / "sweep_math500_pass@1.png").stat().st_size > 1000
    assert "no cell has nowhere" in r.stderr and not (out / "sweep_nowhere.png").exists()
    r = _run(PLOT, "out", "--group-by", "training.steps", cwd=collected)
    assert r.returncode == 2 and "not a grid key" in r.stderr


def test_plot_sweep_collapse_preset(collected):
    """`--metrics collapse` names the diagnostics series; a cell without them is left out."""
    path = collected / "out" / "algorithm.mode=mgrpo,training.seed=1" / "metrics.jsonl"
    with open(path, "a") as f:
        for step in (5, 6):
            f.write(json.dumps({"step": step, "vote_agreement": 0.9, "vote_margin": 0.5,
                                "all_identical_frac": 0.25, "distinct_answers": 2.0,
                                "policy_momentum_agreement": 0.75,
                                "entropy_median": 0.3}) + "\n")
    r = _run(PLOT, "out", "--metrics", "collapse,val_accuracy", cwd=collected)
    assert r.returncode == 0, r.stderr
    for metric in ("vote_agreement", "vote_margin", "all_identical_frac", "distinct_answers",
                   "policy_momentum_agreement", "entropy_median", "val_accuracy"):
        assert (collected / "out" / f"sweep_{metric}.png").stat().st_size > 1000, metric


def test_plot_sweep_without_metrics_is_exit_2(collected):
    for d in (collected / "out").iterdir():
        if d.is_dir():
            shutil.rmtree(d)
    r = _run(PLOT, "out", cwd=collected)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "has metrics" in r.stderr


def test_band_is_mean_min_max_over_members():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import plot_sweep
    finally:
        sys.path.remove(str(REPO / "tools"))
    steps, mean, lo, hi = plot_sweep.band([{0: 1.0, 1: 3.0}, {0: 3.0, 2: 5.0}])
    assert (steps, mean, lo, hi) == ([0, 1, 2], [2.0, 3.0, 5.0], [1.0, 3.0, 5.0],
                                     [3.0, 3.0, 5.0])
    # The report's band: mean -+ the sample std (n - 1), 0 where one member has the step.
    steps, mean, lo, hi = plot_sweep.band([{0: 1.0, 1: 3.0}, {0: 3.0}, {0: 8.0}],
                                          spread="std")
    sd = (((1 - 4) ** 2 + (3 - 4) ** 2 + (8 - 4) ** 2) / 2) ** 0.5
    assert steps == [0, 1] and mean == [4.0, 3.0]
    assert lo == pytest.approx([4 - sd, 3.0]) and hi == pytest.approx([4 + sd, 3.0])
