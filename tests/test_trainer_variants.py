"""The M-GRPO loop's variants end to end, each from its own start (none needs the
uninterrupted reference run of test_trainer.py, so the two files run in parallel): a virtual
pipeline, every mode, a KL term killed and resumed, and bad training data as one line."""

import json
import os

import pytest

from tests import DEADLOCK_GUARD_S
from tests.distributed import run_workers
from tests.test_trainer import strip_timing, train_in_turn, train_worker
from tests.tiny import ROOT, overrides, prepare_base


def test_a_virtual_pipeline_runs_the_same_loop(tmp_path):
    """PP=2 with two model chunks per stage (a 4-layer base: layers 0, 2 | 1, 3) against the
    one-process run: the same first step (its vote, loss and gradient). With a KL term: the
    reference model is laid out in chunks too, so at step 1 (the policy still the base) its
    log-probs equal the policy's and the KL is 0. One step, no validation: that is all it
    compares."""
    base = str(tmp_path / "base")
    prepare_base(base, "--num-layers", "4", "--sft-steps", "20")
    one = ["--algorithm.kl_coef", "0.05", "--training.eval_interval", "0", "--eval.interval", "0"]
    (ref, _), = run_workers(train_worker, 1, overrides(base, str(tmp_path / "ref"), 1, *one))
    vpp = ["--parallel.pipeline_parallel", "2", "--parallel.virtual_pipeline", "2", *one]
    for history, _ in run_workers(train_worker, 2, overrides(base, str(tmp_path / "vpp"), 1,
                                                             *vpp)):
        assert [m["step"] for m in history] == [m["step"] for m in ref] == [1]
        assert history[0]["kl"] == pytest.approx(0.0, abs=1e-9)
        for k in ("reward_mean", "vote_agreement", "pseudo_label_acc", "iqr_dropped_frac"):
            assert history[0][k] == ref[0][k], k
        assert history[0]["loss"] == pytest.approx(ref[0]["loss"], abs=1e-5)
        assert history[0]["grad_norm"] == pytest.approx(ref[0]["grad_norm"], rel=1e-4)
        assert history[0]["entropy_mean"] == pytest.approx(ref[0]["entropy_mean"], rel=1e-4)


REUSE_LAYOUTS = {"dp2": [], "pp2": ["--parallel.pipeline_parallel", "2"]}


def reuse_worker(base, root):
    """srt (no IQR filter, one epoch of one minibatch: exactly on-policy) with the old
    log-probs from the training forward, then from the separate forward, in each layout."""
    out = {}
    for layout, extra in REUSE_LAYOUTS.items():
        for recompute in (False, True):
            run_dir = os.path.join(root, f"{layout}_{recompute}")
            out[layout, recompute] = train_worker(overrides(
                base, run_dir, 2, "--algorithm.mode", "srt", "--rollout.num_momentum_rollouts",
                "0", "--algorithm.iqr_filter", "false", "--training.eval_interval", "0",
                "--eval.interval", "0",
                "--algorithm.recompute_logprobs", str(recompute).lower(), *extra))[0]
    return out


def test_an_on_policy_update_takes_its_old_logprobs_from_the_training_forward(tiny_base,
                                                                              tmp_path):
    """Skipping the separate log-prob forward changes no number: over 2 DP ranks (the values
    gathered from each rank's shard) and over 2 pipeline stages (broadcast from the last), both
    steps' rollouts, votes, losses, grad norms, entropy quartiles and rollout gap are the
    bitwise same as with the forward (the same kernels on the same rows: the training
    forward, before its only optimizer step, computes what the separate one does)."""
    for ranks in run_workers(reuse_worker, 2, tiny_base, str(tmp_path)):
        for layout in REUSE_LAYOUTS:
            reused, recomputed = ranks[layout, False], ranks[layout, True]
            assert [m["logprobs_reused"] for m in reused] == [1.0, 1.0], layout
            assert [m["logprobs_reused"] for m in recomputed] == [0.0, 0.0], layout
            assert "logprob_time_s" not in reused[0] and "logprob_time_s" in recomputed[0]
            for a, b in zip(strip_timing(reused), strip_timing(recomputed)):
                a.pop("logprobs_reused"), b.pop("logprobs_reused")
                assert a == b, layout
                assert a["rollout_logprob_gap"] < 1e-5 and a["entropy_q1"] < a["entropy_q3"]


@pytest.mark.parametrize("mode", [
    ["--algorithm.mode", "srt", "--rollout.num_momentum_rollouts", "0"],
    ["--algorithm.mode", "ttrl", "--rollout.num_momentum_rollouts", "0",
     "--algorithm.ttrl_num_train", "3"],
    ["--algorithm.mode", "rlvr", "--rollout.num_momentum_rollouts", "0"],
], ids=["srt", "ttrl", "rlvr"])
def test_every_mode_runs_through_the_same_loop(tiny_base, tmp_path, mode):
    (history, versions), = run_workers(
        train_worker, 1, overrides(tiny_base, str(tmp_path), 1, "--training.eval_interval", "0",
                                   *mode))
    m = history[-1]
    assert m["step"] == 1 and 0.0 <= m["reward_mean"] <= 1.0
    assert versions[1] is None  # no momentum model outside mgrpo
    assert "policy_momentum_agreement" not in m and 0.0 <= m["vote_margin"] <= 1.0
    if "ttrl" in mode:  # 3 of the M = 6 policy completions per prompt are trained on
        assert m["trained_frac"] <= 0.5


def test_bad_data_is_one_clear_line(tiny_base, tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "train.jsonl"
    bad.write_text('{"prompt": "Q: 1+1? A:", "answer": "2"}\nnot json\n{"answer": "3"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")

    def run(train_path):
        args = overrides(tiny_base, str(tmp_path / "run"), 1, "--data.train_path", str(train_path))
        return subprocess.run([sys.executable, "-m", "megatron_mgrpo.cli", "train",
                               os.path.join(ROOT, "examples/tiny/config.yaml"), *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=DEADLOCK_GUARD_S)

    done = run(empty)
    assert done.returncode == 2
    assert "empty.jsonl" in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("mgrpo: data error:")
    done = run(tmp_path / "missing.jsonl")
    assert done.returncode == 2 and "missing.jsonl" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("case", ["base", "random_init"])
def test_a_run_with_kl_killed_and_resumed_equals_the_uninterrupted_run(tiny_base, tmp_path,
                                                                       case):
    """kl_coef > 0, the reference being the base (model.load rebuilds it) or a random init
    (the checkpoint holds it: the resumed run inits with another seed, so only the saved
    reference can give the uninterrupted run's numbers). The entropy bonus moves the policy
    whatever the rewards, so the KL grows from 0. (The momentum model as the reference needs
    nothing but the EMA, whose resume the other tests cover.)"""
    kl = ["--algorithm.kl_coef", "0.05", "--algorithm.entropy_coef", "0.01",
          "--training.eval_interval", "0", "--eval.interval", "0"]
    if case == "random_init":
        kl += ["--model.load", "null", "--model.hf_config", tiny_base,
               "--data.tokenizer", tiny_base]
    full_dir, part_dir = str(tmp_path / "full"), str(tmp_path / "part")
    # The uninterrupted run and the one to resume share a process; the resume has its own.
    ((full, _), _), = run_workers(train_in_turn, 1, overrides(tiny_base, full_dir, 4, *kl),
                                  overrides(tiny_base, part_dir, 2, *kl))
    other_init = ["--model.seed", "99"] if case == "random_init" else []
    (resumed, _), = run_workers(train_worker, 1, overrides(
        tiny_base, part_dir, 4, "--training.resume", "true", *kl, *other_init))
    assert [m["step"] for m in resumed] == [3, 4]
    assert strip_timing(resumed) == strip_timing(full[-2:])
    assert full[0]["kl"] == pytest.approx(0.0, abs=1e-9) and full[-1]["kl"] > 1e-6
    from megatron_mgrpo.checkpoint import read_trainer_state, step_dir

    assert read_trainer_state(step_dir(part_dir, 2))["has_reference"] == (case == "random_init")


def test_training_without_train_path_is_one_line(tiny_base, tmp_path):
    import subprocess
    import sys

    args = overrides(tiny_base, str(tmp_path), 1, "--data.train_path", "null")
    done = subprocess.run([sys.executable, "-m", "megatron_mgrpo.cli", "train",
                           os.path.join(ROOT, "examples/tiny/config.yaml"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=DEADLOCK_GUARD_S)
    assert done.returncode == 2
    assert done.stderr.strip() == ("mgrpo: config error: data.train_path: got None; accepted: "
                                   "a jsonl or parquet file of training prompts (mgrpo train "
                                   "needs one)")
    missing = subprocess.run([sys.executable, "-m", "megatron_mgrpo.cli", "eval",
                              os.path.join(ROOT, "examples/tiny/config.yaml"), "--checkpoint",
                              str(tmp_path / "nope"), *args],
                             capture_output=True, text=True, cwd=ROOT, timeout=DEADLOCK_GUARD_S)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "--checkpoint: no checkpoint directory at" in missing.stderr
