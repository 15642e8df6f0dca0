"""Faults a real run meets, through the real `mgrpo train` command in its own process: a run
directory that holds a run, a second trainer on it, SIGTERM and SIGINT, a non-finite step, a
full disk, a damaged checkpoint. Each ends in one line, saves what can be resumed (never NaN
weights), leaves no process behind, and the resumed run equals an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_mgrpo.cli import main as mgrpo
from megatron_mgrpo.run_dir import RunDirLock, claim_run_dir
from tests.tiny import ROOT, TINY_CONFIG, overrides

# Evaluations off: these runs are about the loop's life, not its scores.
QUIET = ["--training.eval_interval", "0", "--eval.interval", "0", "--eval.benchmarks", "[]",
         "--logging.progress_bar", "false", "--logging.tensorboard", "false"]


def args(base, run_dir, steps, *extra):
    return [TINY_CONFIG, *overrides(base, str(run_dir), steps, *QUIET, *extra)]


def start(base, run_dir, steps, *extra):
    return subprocess.Popen([sys.executable, "-m", "megatron_mgrpo.cli", "train",
                             *args(base, run_dir, steps, *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def train(base, run_dir, steps, *extra):
    """`mgrpo train` to its end: (exit code, stdout, stderr)."""
    p = start(base, run_dir, steps, *extra)
    out, err = p.communicate()
    return p.returncode, out, err


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def comparable(metrics):
    return [{k: v for k, v in m.items() if not k.endswith("_time_s")} for m in metrics]


def last_line(text):
    return [line for line in text.strip().splitlines() if line.strip()][-1]


def wait_for_step(proc, run_dir, step):
    """Wait (no limit: a slow machine is not a failure) until the run has logged `step`."""
    while proc.poll() is None:
        path = os.path.join(run_dir, "metrics.jsonl")
        if os.path.exists(path) and any(m["step"] >= step for m in rows(run_dir)):
            return
        time.sleep(0.2)
    raise AssertionError(f"the run ended before step {step}: {proc.communicate()}")


def descendants(pid):
    """The pids of every process below `pid` (from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ---- the run directory ---------------------------------------------------------------------

def test_a_run_dir_holds_one_run(tiny_base, tmp_path, capsys):
    """A fresh start over a run is refused; --training.overwrite clears what the trainer wrote
    (only that); a run_dir that is a file, and one locked by another trainer, are refused."""
    cfg = args(tiny_base, tmp_path / "unused", 1)
    held = tmp_path / "held"
    (held / "checkpoints" / "step_0000002").mkdir(parents=True)
    (held / "metrics.jsonl").write_text('{"step": 0}\n')
    (held / "notes.txt").write_text("mine")
    assert mgrpo(["train", *cfg, "--training.run_dir", str(held)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"mgrpo: config error: training.run_dir '{held}' already holds a run; continue it "
        "with --resume, start over with --training.overwrite true (deletes its metrics and "
        "checkpoints), or choose another --training.run_dir")

    a_file = tmp_path / "file"
    a_file.write_text("")
    assert mgrpo(["train", *cfg, "--training.run_dir", str(a_file)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"mgrpo: config error: training.run_dir: got '{a_file}'; accepted: a directory (this "
        "path is a file)")

    with RunDirLock(str(held)):  # another trainer holds it (a flock is per open file)
        assert mgrpo(["train", *cfg, "--training.run_dir", str(held), "--resume"]) == 2
        err = capsys.readouterr().err.strip()
    assert err.startswith(f"mgrpo: config error: training.run_dir '{held}' is in use by "
                          f"another trainer (pid {os.getpid()} on ")

    lock = claim_run_dir(str(held), resume=False, overwrite=True, rank=0)
    lock.release()
    assert sorted(os.listdir(held)) == [".lock", "notes.txt"]


def test_a_fresh_metrics_log_never_keeps_an_earlier_runs_rows(tmp_path):
    from megatron_mgrpo.metrics import MetricsLogger, read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n{"step": 2}\n')
    MetricsLogger(str(tmp_path), 4, start_step=1, tensorboard=False,
                  progress_bar=False).close()
    assert [m["step"] for m in read_metrics(str(tmp_path))] == [0, 1]
    log = MetricsLogger(str(tmp_path), 4, start_step=0, tensorboard=False, progress_bar=False)
    log.log({"step": 0, "loss": 1.0}, advance=False)
    log.close()
    assert [m["step"] for m in read_metrics(str(tmp_path))] == [0]


# ---- signals -------------------------------------------------------------------------------

STEPS = 8  # room for two stops (each after the step running when the signal comes) and a rest

@pytest.fixture(scope="module")
def uninterrupted(tiny_base, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    code, _, err = train(tiny_base, run_dir, STEPS)
    assert code == 0, err[-3000:]
    return rows(run_dir)


def test_sigterm_and_sigint_save_and_the_resumed_run_equals_an_uninterrupted_one(
        tiny_base, uninterrupted, tmp_path, capsys):
    """SIGTERM, then SIGINT on the resumed run: each finishes its step, saves it, says how to
    resume and exits 128 + signal, leaving no process; a second trainer on the directory
    meanwhile is refused, naming the holder. The run resumed to its end equals one never
    stopped."""
    run_dir = tmp_path / "run"
    stopped_at = []
    for sig, name, after in ((signal.SIGTERM, "SIGTERM", 1), (signal.SIGINT, "SIGINT", None)):
        resume = ["--training.resume", "true"] if stopped_at else []
        proc = start(tiny_base, run_dir, STEPS, *resume)
        wait_for_step(proc, run_dir, after or stopped_at[-1] + 1)
        if sig == signal.SIGTERM:  # a second `mgrpo train` on the directory meanwhile
            capsys.readouterr()
            assert mgrpo(["train", *args(tiny_base, run_dir, STEPS, "--resume")]) == 2
            assert (f"is in use by another trainer (pid {proc.pid} on "
                    in capsys.readouterr().err)
        below = descendants(proc.pid)
        proc.send_signal(sig)
        out, err = proc.communicate()
        assert proc.returncode == 128 + sig, err[-3000:]
        assert last_line(err) == f"mgrpo: stopped by {name}"
        assert "Traceback" not in err
        saved = [line for line in out.splitlines() if line.startswith(f"stopped ({name})")]
        assert len(saved) == 1 and saved[0].endswith("continue with the same command and "
                                                     "--resume"), out[-2000:]
        step = int(saved[0].split("after step ")[1].split(",")[0])
        assert os.path.isdir(run_dir / "checkpoints" / f"step_{step:07d}")
        assert (run_dir / "checkpoints" / "latest").read_text() == str(step)
        stopped_at.append(step)
        left = [pid for pid in below if alive(pid)]
        assert not left, f"processes outlived the trainer: {left}"
    code, out, err = train(tiny_base, run_dir, STEPS, "--training.resume", "true")
    assert code == 0, err[-3000:]
    assert f"resumed from step {stopped_at[-1]}" in out
    assert comparable(rows(run_dir)) == comparable(uninterrupted)


# ---- non-finite steps ----------------------------------------------------------------------

def overflowing_base(tiny_base, out, value):
    """The tiny base with one row of a weight set to `value`: inf, or a finite number whose
    products overflow (the forward then gives inf and NaN with finite weights)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_base, out)
    path = os.path.join(out, "model.safetensors")
    weights = load_file(path)
    weights["model.layers.1.mlp.down_proj.weight"][0, :] = value
    save_file(weights, path, metadata={"format": "pt"})
    return out


def test_a_non_finite_step_stops_the_run_and_nothing_non_finite_is_saved(tiny_base, tmp_path):
    # Finite weights whose forward overflows: the default (stop) ends the run at step 1.
    base = overflowing_base(tiny_base, str(tmp_path / "big"), 3e38)
    code, _, err = train(base, tmp_path / "stop", 2, "--model.load", base,
                         "--training.save_interval", "1")
    assert code == 1
    assert last_line(err) == ("mgrpo: step 1: loss nan, grad norm nan: stopped "
                              "(training.on_nonfinite stop), nothing from this step was "
                              "saved; no checkpoint was saved")
    assert not os.path.exists(tmp_path / "stop" / "checkpoints")

    # on_nonfinite skip: every step's update is refused, the run goes on; with an inf weight
    # the save is refused too (a checkpoint to resume from never holds inf or NaN).
    base = overflowing_base(tiny_base, str(tmp_path / "inf"), float("inf"))
    code, out, err = train(base, tmp_path / "skip", 2, "--model.load", base,
                           "--training.on_nonfinite", "skip", "--training.save_interval", "2")
    assert code == 1, err[-3000:]
    assert [m["nonfinite_skipped"] for m in rows(tmp_path / "skip")] == [1.0, 1.0]
    assert "step 1: loss nan, grad norm nan: update skipped (training.on_nonfinite skip)" in out
    # The policy's weight and its EMA.
    assert last_line(err) == ("mgrpo: checkpoint error: step 2: 2 of the weight tensors "
                              "(policy, momentum model) hold inf or NaN: not saved, stopping")
    assert not os.path.exists(tmp_path / "skip" / "checkpoints")


# ---- saves that fail, checkpoints that do not load -----------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs (three tiny checkpoints) (needs root, as in CI here; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_save_onto_a_full_disk_says_so_and_the_run_resumes_from_the_previous_checkpoint(
        tiny_base, small_disk):
    run_dir = small_disk / "run"
    code, out, err = train(tiny_base, run_dir, 1, "--training.resume", "true",
                           "--training.save_interval", "1")
    assert code == 0, err[-3000:]
    assert f"--resume: nothing is saved in {run_dir} yet: starting at step 0" in out
    one = run_dir / "checkpoints" / "step_0000001"
    size = sum(f.stat().st_size for f in one.iterdir())
    filler = small_disk / "filler"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler.write_bytes(b"\0" * max(0, free - size // 2))  # room for half a checkpoint

    code, _, err = train(tiny_base, run_dir, 2, "--training.resume", "true",
                         "--training.save_interval", "1")
    assert code == 1
    line = last_line(err)
    assert line.startswith(f"mgrpo: checkpoint error: saving step 2 to {run_dir}/checkpoints/"
                           "step_0000002 failed: no space left on device"), line
    assert line.endswith("; the newest checkpoint is still step 1")
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["latest", "step_0000001"]

    filler.unlink()
    code, out, err = train(tiny_base, run_dir, 2, "--training.resume", "true",
                           "--training.save_interval", "1")
    assert code == 0, err[-3000:]
    assert f"resumed from step 1 ({one})" in out
    assert [m["step"] for m in rows(run_dir)] == [1, 2]


def test_a_killed_run_leaves_no_process_and_a_damaged_newest_checkpoint_is_skipped(
        tiny_base, uninterrupted, tmp_path):
    """SIGKILL right after a save (megatron's checkpoint writer would leave a Manager server
    and a resource tracker behind): nothing the trainer started outlives it. Then its newest
    checkpoint is cut short and `latest` garbled: resume skips it, saying why, loads the one
    before, and goes on as the uninterrupted run did."""
    run_dir = tmp_path / "run"
    latest = run_dir / "checkpoints" / "latest"
    proc = start(tiny_base, run_dir, STEPS, "--training.save_interval", "1")
    while proc.poll() is None and not (latest.exists() and int(latest.read_text()) >= 2):
        time.sleep(0.1)
    below = descendants(proc.pid)
    proc.kill()
    proc.wait()  # not communicate(): an orphan holding the pipes would block it forever
    proc.stdout.close()
    proc.stderr.close()
    deadline = time.time() + 120  # orphans notice their parent's death within moments
    while any(alive(pid) for pid in below) and time.time() < deadline:
        time.sleep(0.5)
    left = [pid for pid in below if alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "processes outlived a killed trainer"

    newest = int(latest.read_text())
    shard = next(p for p in sorted((run_dir / "checkpoints" / f"step_{newest:07d}").iterdir())
                 if p.suffix == ".distcp")
    written = shard.stat().st_size
    with open(shard, "r+b") as f:  # a copy cut short, as a full disk or a bad node leaves it
        f.truncate(written // 2)
    latest.write_text("garbage")
    code, out, err = train(tiny_base, run_dir, newest + 1, "--training.resume", "true",
                           "--training.save_interval", "1")
    assert code == 0, err[-3000:]
    assert (f"--resume: skipping the checkpoint of step {newest}: {shard.name} has "
            f"{written // 2} bytes, {written} were written") in out
    assert f"resumed from step {newest - 1}" in out
    assert comparable(rows(run_dir)) == comparable(uninterrupted[:newest + 1])


# ---- a rollout server lost for good ---------------------------------------------------------

def test_a_lost_rollout_server_ends_the_run_in_one_line_after_saving(tiny_base, tmp_path):
    """The only (attached) server is killed mid-run: the run ends with one line, exit code 1,
    after saving the last consistent step: the previous one when the failure came before the
    update, this one when the update was done (the push failed)."""
    import re

    from megatron_mgrpo.parallel import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "megatron_mgrpo.cli", "serve", "--model",
                               tiny_base, "--port", str(port)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        run_dir = tmp_path / "run"
        proc = start(tiny_base, run_dir, STEPS, "--training.save_interval", "0",
                     "--rollout.backend", "sglang",
                     "--sglang.urls", f'["http://127.0.0.1:{port}"]')
        wait_for_step(proc, run_dir, 1)
        server.kill()
        out, err = proc.communicate()
    finally:
        server.kill()
        server.wait()
    assert proc.returncode == 1, err[-3000:]
    line = last_line(err)
    got = re.fullmatch(r"mgrpo: step (\d+): the rollout failed: (.+); saved step (\d+) "
                       r"\(--resume continues from it\)", line)
    assert got, line
    failed, saved = int(got.group(1)), int(got.group(3))
    assert saved in (failed - 1, failed) and saved >= 1
    assert (run_dir / "checkpoints" / "latest").read_text() == str(saved)
    assert "Traceback" not in err
