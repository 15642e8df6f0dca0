"""The M-GRPO loop end to end on a quickly warmed-up tiny base: metrics, plots, checkpoints, a
resumed run equal to an uninterrupted one, TP=2 / PP=2 runs of the same loop, and all modes."""

import importlib.util
import json
import os

import pytest

from tests import DEADLOCK_GUARD_S
from tests.distributed import run_workers
from tests.tiny import ROOT, overrides

REQUIRED = ("step", "reward_mean", "entropy_mean", "entropy_q1", "entropy_q3",
            "iqr_dropped_frac", "vote_agreement", "pseudo_label_acc", "loss", "grad_norm",
            "step_time_s", "rollout_logprob_gap")
TIMING = ("step_time_s", "push_time_s")


def train_worker(args):
    from megatron_mgrpo.config import load_config
    from megatron_mgrpo.session import Session
    from megatron_mgrpo.trainer import run_training

    cfg = load_config(os.path.join(ROOT, "examples/tiny/config.yaml"), args)
    with Session(cfg, "train") as session:
        history = run_training(session)
        versions = None
        if session.engine is not None:
            versions = (session.engine.weight_version("policy"),
                        session.engine.weight_version("momentum"))
    return history, versions


def train_in_turn(*runs):
    """Several runs one after another in one process (a Session each): one start-up for runs
    that need no fresh process of their own. A run whose numbers are checked against another
    process's (a resume) still gets its own process."""
    return [train_worker(args) for args in runs]


def strip_timing(history):
    return [{k: v for k, v in m.items() if k not in TIMING and not k.endswith("_time_s")}
            for m in history]


@pytest.fixture(scope="module")
def runs(tiny_base, tmp_path_factory):
    """The uninterrupted 4-step run and, after it in the same process, the first halves that
    two tests resume (each resume in a process of its own): a 2-step run ("killed" after step
    2), and a run that a stop file stops after step 1."""
    run_dir = str(tmp_path_factory.mktemp("run_full"))
    part_dir = str(tmp_path_factory.mktemp("run_part"))
    stop_dir = tmp_path_factory.mktemp("run_stopped")
    stop = stop_dir / "STOP"
    stop.write_text("")
    full, _, stopped = run_workers(
        train_in_turn, 1, overrides(tiny_base, run_dir, 4), overrides(tiny_base, part_dir, 2),
        overrides(tiny_base, str(stop_dir / "run"), 4, "--training.stop_file", str(stop)))[0]
    return {"full": (run_dir, full), "part": part_dir,
            "stopped": (str(stop_dir / "run"), stop, stopped)}


@pytest.fixture(scope="module")
def uninterrupted(runs):
    return runs["full"]


def test_run_writes_metrics_plots_and_checkpoints(uninterrupted):
    run_dir, (history, versions) = uninterrupted
    steps = [m for m in history if m["step"] > 0]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    for m in steps:
        missing = [k for k in REQUIRED if k not in m]
        assert not missing, missing
        assert 0.0 <= m["reward_mean"] <= 1.0 and 0.0 <= m["iqr_dropped_frac"] <= 1.0
        assert m["entropy_q1"] <= m["entropy_q3"]
    assert all("val_accuracy" in m for m in steps if m["step"] % 2 == 0)
    assert history[0]["step"] == 0 and "val_accuracy" in history[0]  # the base, before RL
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        logged = [json.loads(line)["step"] for line in f]
    assert logged == [0, 1, 2, 3, 4]
    for png in ("reward.png", "entropy.png", "pseudo_label_acc.png", "val_accuracy.png",
                "benchmarks.png"):
        assert os.path.getsize(os.path.join(run_dir, png)) > 1000, png
    assert os.listdir(os.path.join(run_dir, "tensorboard"))
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == [
        "latest", "step_0000002", "step_0000004"]
    assert versions == (4, 4)  # the engine holds the last step's policy and momentum weights
    # Benchmarks at the base, every 2 steps and the end; each report beside the metrics.
    assert [m["step"] for m in history if "math500/pass@1" in m] == [0, 2, 4]
    assert sorted(os.listdir(os.path.join(run_dir, "eval"))) == [
        "step_0.json", "step_2.json", "step_4.json"]
    with open(os.path.join(run_dir, "eval", "step_4.json")) as f:
        report = json.load(f)["benchmarks"]["math500"]
    assert report["problems_scored"] == 8 and report["samples"] == 2
    assert report["metrics"]["pass@1"] == history[-1]["math500/pass@1"]
    from megatron_mgrpo.checkpoint import read_trainer_state, step_dir
    from megatron_mgrpo.config import load_config

    saved = load_config(os.path.join(run_dir, "config.yaml"))
    assert saved.training.steps == 4 and saved.training.run_dir == run_dir
    state = read_trainer_state(step_dir(run_dir, 4))
    assert state["step"] == 4 and "training:" in state["config"]


def test_resumed_run_equals_uninterrupted(tiny_base, runs):
    _, (full, _) = runs["full"]
    run_dir = runs["part"]  # "killed" after step 2
    (resumed, _), = run_workers(train_worker, 1,
                                overrides(tiny_base, run_dir, 4, "--training.resume", "true"))
    assert [m["step"] for m in resumed] == [3, 4]
    assert strip_timing(resumed) == strip_timing(full[-2:])
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [0, 1, 2, 3, 4]


def test_a_stop_file_saves_and_stops_and_the_requeued_run_goes_on(tiny_base, runs):
    """What the slurm launchers do on the time-limit signal: the stop file makes the run save
    after its current step and return; the requeued run resumes as if never stopped."""
    _, (full, _) = runs["full"]
    run_dir, stop, (stopped, _) = runs["stopped"]  # the stop file was there from its start
    assert [m["step"] for m in stopped] == [0, 1]
    assert "step_0000001" in os.listdir(os.path.join(run_dir, "checkpoints"))
    stop.unlink()
    (resumed, _), = run_workers(train_worker, 1, overrides(
        tiny_base, run_dir, 4, "--training.stop_file", str(stop), "--training.resume", "true"))
    assert [m["step"] for m in resumed] == [2, 3, 4]
    assert strip_timing(resumed) == strip_timing(full[2:])


LAYOUTS = {"tp2": ["--parallel.tensor_parallel", "2"],
           "pp2": ["--parallel.pipeline_parallel", "2"]}


def layouts_worker(base, root):
    return {name: train_worker(overrides(base, os.path.join(root, name), 2, *layout))
            for name, layout in LAYOUTS.items()}


@pytest.fixture(scope="module")
def two_process_runs(tiny_base, tmp_path_factory):
    """Both layouts' runs, one after the other in the same two processes."""
    return run_workers(layouts_worker, 2, tiny_base, str(tmp_path_factory.mktemp("layouts")))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_process_layouts_run_the_same_loop(uninterrupted, two_process_runs, layout):
    _, (full, _) = uninterrupted
    for history, _ in (rank[layout] for rank in two_process_runs):
        first = history[1]
        # Step 1 samples from the same base weights: identical rollouts, votes and rewards.
        for k in ("reward_mean", "vote_agreement", "pseudo_label_acc", "iqr_dropped_frac"):
            assert first[k] == full[1][k], k
        assert first["loss"] == pytest.approx(full[1]["loss"], abs=1e-5)
        assert first["entropy_mean"] == pytest.approx(full[1]["entropy_mean"], rel=1e-4)


def test_the_sglang_backend_runs_the_same_loop(tiny_base, uninterrupted, tmp_path):
    """The same run with its rollouts from a launched `mgrpo serve` process over HTTP (swap
    placement: one server loads the policy and the momentum model in turn; disk transport):
    the same completions, so the same votes, rewards and losses, step after step."""
    import sys

    _, (full, _) = uninterrupted
    serve = f"{sys.executable} -m megatron_mgrpo.cli serve --model {{model}} --port {{port}}"
    (history, versions), = run_workers(train_worker, 1, overrides(
        tiny_base, str(tmp_path), 4, "--rollout.backend", "sglang", "--sglang.launch", "1",
        "--sglang.launch_command", serve))
    assert versions == (4, 4)
    # The server ran and read what was pushed: its log, and one version per set on disk.
    assert os.listdir(tmp_path / "server_logs")
    assert sorted(os.listdir(tmp_path / "pushed_weights" / "momentum")) == ["v4"]
    assert [m["step"] for m in history] == [m["step"] for m in full]
    for got, want in zip(history, full):
        for k in ("reward_mean", "vote_agreement", "pseudo_label_acc", "iqr_dropped_frac",
                  "completion_len", "val_accuracy", "val_maj"):
            assert got.get(k) == want.get(k), (got["step"], k)
        for k in ("loss", "entropy_mean", "val_token_logprob"):
            if k in want:
                assert got[k] == pytest.approx(want[k], abs=1e-4), (got["step"], k)


def test_fp8_rollout_weights_through_both_backends(tiny_base, uninterrupted, tmp_path):
    """rollout.weight_format fp8: the embedded engine and a launched `mgrpo serve` (started
    from the FP8 copy of the base that the trainer writes) sample from the same FP8 weights,
    so the same completions; the engine's log-probs now differ from the trainer's. Both runs
    in one process, one after the other; no benchmark passes (none of theirs is compared)."""
    import sys

    _, (full, _) = uninterrupted
    fp8 = ["--rollout.weight_format", "fp8", "--rollout.fp8_block_size", "32",
           "--eval.interval", "0"]
    serve = f"{sys.executable} -m megatron_mgrpo.cli serve --model {{model}} --port {{port}}"
    ((embedded, _), (served, versions)), = run_workers(
        train_in_turn, 1, overrides(tiny_base, str(tmp_path / "embedded"), 2, *fp8),
        overrides(tiny_base, str(tmp_path / "served"), 2, *fp8, "--rollout.backend", "sglang",
                  "--sglang.launch", "1", "--sglang.launch_command", serve))
    assert versions == (2, 2)
    with open(tmp_path / "served" / "rollout_base_fp8_b32" / "config.json") as f:
        assert json.load(f)["quantization_config"]["weight_block_size"] == [32, 32]
    for got, want in zip(served, embedded):
        for k in ("reward_mean", "vote_agreement", "completion_len", "val_accuracy"):
            assert got.get(k) == want.get(k), (got["step"], k)
        if got["step"] > 0:
            assert got["rollout_logprob_gap"] == pytest.approx(want["rollout_logprob_gap"],
                                                               rel=1e-3)
    trained = [m for m in full if m["step"] > 0]
    assert max(m["rollout_logprob_gap"] for m in trained) < 1e-4  # fp32 weights: same model
    assert min(m["rollout_logprob_gap"] for m in embedded if m["step"] > 0) > 1e-3


def eval_worker(args):
    from megatron_mgrpo.config import load_config
    from megatron_mgrpo.evaluation.run import evaluate_checkpoint

    return evaluate_checkpoint(load_config(os.path.join(ROOT, "examples/tiny/config.yaml"), args))


def test_eval_of_the_final_checkpoint_reproduces_the_runs_last_validation(tiny_base,
                                                                          uninterrupted):
    run_dir, (history, _) = uninterrupted
    (result,) = run_workers(eval_worker, 1, overrides(tiny_base, run_dir, 4))
    assert result["val_accuracy"] == history[-1]["val_accuracy"]
    assert result["val_maj"] == history[-1]["val_maj"]
    # Accuracy of the tiny test base can be 0 either way; the log-prob cannot hide a wrong load.
    assert result["val_token_logprob"] == history[-1]["val_token_logprob"]
    assert result["val_token_logprob"] != history[0]["val_token_logprob"]
    for k in ("math500/pass@1", "math500/maj@2", "math500/completion_tokens"):
        assert result[k] == history[-1][k], k


def export_worker(run_dir, out_dir, which):
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_mgrpo.checkpoint import latest_step, load_checkpoint, step_dir
    from megatron_mgrpo.config import load_config
    from megatron_mgrpo.data.tokenizer import load_tokenizer
    from megatron_mgrpo.models.policy import MegatronPolicy
    from megatron_mgrpo.optim.momentum import MomentumSchedule, ShardedMomentum
    from megatron_mgrpo.parallel import init_parallel
    from megatron_mgrpo.weights.push import iter_hf_tensors, momentum_tensor_of

    spec = importlib.util.spec_from_file_location(
        "convert", os.path.join(ROOT, "tools/convert_megatron_to_hf.py"))
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    convert.main(["--ckpt", run_dir, "--out", out_dir, "--model", which, "--dtype", "fp32"])

    # The reference: the same checkpoint loaded into a Megatron policy and momentum model.
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    policy = MegatronPolicy(cfg, init_parallel(cfg.parallel))
    momentum = ShardedMomentum(policy, MomentumSchedule.from_config(cfg.algorithm))
    load_checkpoint(step_dir(run_dir, latest_step(run_dir)), policy, momentum,
                    load_optimizer=False)
    want = dict(iter_hf_tensors(policy, momentum_tensor_of(momentum) if which == "momentum"
                                else None))
    hf = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True).eval()
    got = hf.state_dict()
    tok = load_tokenizer(out_dir)  # the tokenizer travelled with the export
    ids = torch.tensor([[tok.bos_id] + tok.encode("Q: Ann has 3 pens. A: 3+4=7, \\boxed{7}")])
    with torch.no_grad():
        dense = torch.log_softmax(hf(input_ids=ids).logits[:, :-1].float(), -1)
    hf_lp = dense.gather(-1, ids[:, 1:, None]).squeeze(-1)
    mg_lp, _ = policy.logprobs({"input_ids": ids}, with_entropy=False)
    return {"equal": all(torch.equal(got[k], v) for k, v in want.items()),
            "names": sorted(want), "hf_names": sorted(k for k in got if k != "lm_head.weight"),
            "hf_lp": hf_lp, "mg_lp": mg_lp[:, 1:], "first": want[sorted(want)[0]]}


def test_export_to_hf_holds_the_checkpoints_policy_and_momentum(uninterrupted, tmp_path):
    import torch

    run_dir, _ = uninterrupted
    (policy,) = run_workers(export_worker, 1, run_dir, str(tmp_path / "policy"), "policy")
    assert policy["equal"] and policy["names"] == policy["hf_names"]
    torch.testing.assert_close(policy["hf_lp"], policy["mg_lp"], atol=2e-5, rtol=1e-5)
    (ema,) = run_workers(export_worker, 1, run_dir, str(tmp_path / "momentum"), "momentum")
    assert ema["equal"] and not torch.equal(ema["first"], policy["first"])
    assert not os.path.exists(str(tmp_path / "policy") + ".tmp")


def test_eval_of_the_exported_model_equals_the_runs_last_benchmark_eval(tiny_base, uninterrupted,
                                                                        tmp_path):
    """`mgrpo eval --model` on the final checkpoint exported to HF: no Megatron model, weights
    loaded by transformers, yet the same completions as the trainer's last benchmark pass."""
    import subprocess
    import sys

    run_dir, (history, _) = uninterrupted
    run_workers(export_worker, 1, run_dir, str(tmp_path / "policy"), "policy")
    args = overrides(tiny_base, str(tmp_path / "run"), 4)
    run = subprocess.run([sys.executable, "-m", "megatron_mgrpo.cli", "eval",
                          os.path.join(ROOT, "examples/tiny/config.yaml"),
                          "--model", str(tmp_path / "policy"), *args],
                         capture_output=True, text=True, timeout=DEADLOCK_GUARD_S)
    assert run.returncode == 0, run.stderr
    with open(tmp_path / "run" / "eval" / "policy.json") as f:
        metrics = json.load(f)["benchmarks"]["math500"]["metrics"]
    for k in ("pass@1", "maj@2", "answered", "completion_tokens"):
        assert metrics[k] == history[-1][f"math500/{k}"], k


def test_a_run_from_the_converted_base_equals_the_run_from_the_hf_base(tiny_base, uninterrupted,
                                                                       tmp_path):
    """`model.load` pointing at convert_hf_to_megatron.py's output (fp32, chunked for TP=2)
    starts from the same weights: the first two steps' metrics match the HF-base run's."""
    import torch

    from megatron_mgrpo.weights.convert import convert_hf_to_megatron

    converted = str(tmp_path / "converted")
    convert_hf_to_megatron(tiny_base, converted, tp=2, dtype=torch.float32, log=lambda _: None)
    assert os.path.isfile(os.path.join(converted, "tokenizer.model"))
    run_dir = str(tmp_path / "run")
    args = overrides(tiny_base, run_dir, 1, "--model.load", converted)
    (result,) = run_workers(train_worker, 1, args)
    history = strip_timing(result[0])
    reference = strip_timing(uninterrupted[1][0])
    assert len(history) == 2 and "val_token_logprob" in history[0]
    assert history[0] == reference[0]
    # This run validates at its last step (1); the reference does not: compare the rest.
    assert {k: history[1][k] for k in reference[1]} == reference[1]


def test_eval_prints_its_table_and_needs_no_training_data(tiny_base, uninterrupted):
    """`mgrpo eval CONFIG --checkpoint DIR`: what it loads and the benchmark table on stdout,
    with data.train_path unset (eval reads no training data)."""
    import subprocess
    import sys

    run_dir, (history, _) = uninterrupted
    args = overrides(tiny_base, run_dir, 4, "--data.train_path", "null")
    done = subprocess.run([sys.executable, "-m", "megatron_mgrpo.cli", "eval",
                           os.path.join(ROOT, "examples/tiny/config.yaml"), "--checkpoint",
                           os.path.join(run_dir, "checkpoints", "step_0000004"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=DEADLOCK_GUARD_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "eval: loading" in done.stdout and "step_0000004" in done.stdout
    assert f"val_accuracy (pass@1, k=2) {history[-1]['val_accuracy']:.4f}" in done.stdout
    table = [line for line in done.stdout.splitlines() if line.startswith("math500")]
    assert table and "pass@1" in done.stdout
