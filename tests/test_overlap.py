"""rollout.overlap: generation of the next step beside training, from a launched `mgrpo serve`
process (the embedded engine behind SGLang's HTTP API, in its own process). The weight version
behind every step's completions is the expected one (the server stamps it and the client
refuses any other); the made-ahead ones are one step behind; the policy's are on-policy in
`momentum` mode and off-policy in `full`, where the importance weight moves off 1. The config
checks refuse what cannot overlap. Sequential runs (`none`) are tests/test_trainer.py's."""

import os
import sys

import pytest

from tests.distributed import run_workers
from tests.tiny import ROOT, overrides

SERVE = f"{sys.executable} -m megatron_mgrpo.cli serve --model {{model}} --port {{port}}"
SERVERS = ["--rollout.backend", "sglang", "--sglang.urls", "[http://127.0.0.1:1]"]
ROLLOUT_KEYS = ("reward_mean", "vote_agreement", "pseudo_label_acc", "completion_len",
                "distinct_answers")


def train_worker(args):
    from megatron_mgrpo.config import load_config
    from megatron_mgrpo.session import Session
    from megatron_mgrpo.trainer import run_training

    cfg = load_config(os.path.join(ROOT, "examples/tiny/config.yaml"), args)
    with Session(cfg, "train") as session:
        return run_training(session)


@pytest.fixture(scope="module")
def runs(tiny_base, tmp_path_factory):
    out = {}
    for overlap, extra in (("momentum", []), ("full", ["--algorithm.tis_cap", "2"])):
        run_dir = str(tmp_path_factory.mktemp(f"overlap_{overlap}"))
        (history,) = run_workers(train_worker, 1, overrides(
            tiny_base, run_dir, 3, "--rollout.backend", "sglang", "--sglang.launch", "1",
            "--sglang.launch_command", SERVE, "--rollout.overlap", overlap,
            "--training.eval_interval", "0", "--eval.interval", "0",
            "--optimizer.lr", "1e-3", *extra))
        out[overlap] = [m for m in history if m["step"] > 0]
    return out


def test_versions_behind_each_steps_completions(runs):
    # Pushed after step t as version t (the base as 0): a sequential step s samples version
    # s - 1; made ahead (during step s - 1), version s - 2; step 1 has nothing made ahead.
    momentum, full = runs["momentum"], runs["full"]
    assert [m["step"] for m in momentum] == [1, 2, 3]
    assert [m["policy_version"] for m in momentum] == [0, 1, 2]
    assert [m["momentum_version"] for m in momentum] == [0, 0, 1]
    assert [m["momentum_staleness"] for m in momentum] == [0, 1, 1]
    assert [m.get("made_ahead_sets", 0) for m in momentum] == [0, 1, 1]
    assert [m["policy_version"] for m in full] == [0, 0, 1]
    assert [m["momentum_version"] for m in full] == [0, 0, 1]
    assert [m["policy_staleness"] for m in full] == [0, 1, 1]
    assert [m.get("made_ahead_sets", 0) for m in full] == [0, 2, 2]


def test_step_one_is_the_same_rollout_and_later_policy_samples_are_stale_only_in_full(runs):
    momentum, full = runs["momentum"], runs["full"]
    for k in ROLLOUT_KEYS:  # same seeds, same base weights, nothing made ahead yet
        assert momentum[0][k] == full[0][k], k
    # The gap between the engine's and the trainer's log-probs of the policy's completions:
    # ~0 where the completions are on-policy (fp32 both sides), not where they are a step old.
    assert max(m["rollout_logprob_gap"] for m in momentum) < 1e-4
    assert full[0]["rollout_logprob_gap"] < 1e-4
    assert min(m["rollout_logprob_gap"] for m in full[1:]) > 1e-3
    assert full[0]["tis_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert all(abs(m["tis_weight_mean"] - 1.0) > 1e-4 for m in full[1:])
    # The phase times: generation ahead counted for the step it was made for, the wait for it
    # logged by the step it ran beside (not by the last step: no step comes after it).
    for m in momentum[1:] + full[1:]:
        assert m["generate_momentum_time_s"] > 0
    for m in momentum[:-1] + full[:-1]:
        assert m["overlap_wait_time_s"] >= 0
    assert "overlap_wait_time_s" not in momentum[-1] and "overlap_wait_time_s" not in full[-1]
    assert all(m["generate_policy_time_s"] > 0 for m in full[1:])


@pytest.mark.parametrize("args, message", [
    (["--rollout.overlap", "momentum"], "none with rollout.backend embedded"),
    (["--rollout.overlap", "momentum", *SERVERS, "--algorithm.mode", "srt",
      "--rollout.num_momentum_rollouts", "0"], "none or full in mode srt"),
    (["--rollout.overlap", "full", *SERVERS],
     "algorithm.tis_cap: got None; accepted: a number >= 1 with rollout.overlap full"),
    (["--rollout.overlap", "momentum", *SERVERS, "--rollout.momentum_push_interval", "2"],
     "1 with rollout.overlap momentum"),
    (["--rollout.overlap", "later"], "rollout.overlap: got 'later'"),
])
def test_config_refuses_what_cannot_overlap(tiny_base, args, message):
    from megatron_mgrpo.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(ROOT, "examples/tiny/config.yaml"),
                    ["--model.load", tiny_base, *args]).validate()
    assert message in str(e.value)
