"""The update path end to end (vote -> rewards -> entropy -> IQR -> advantages -> clipped loss ->
megatron step -> EMA) on the fixed synthetic batch: it learns, and TP=2 / DP=2 give TP=1's
numbers step for step."""

import pytest

from tests.distributed import in_turn, run_workers

KEYS = ("loss", "grad_norm", "reward_mean", "vote_agreement", "entropy_mean",
        "iqr_dropped_frac", "logp_agree", "logp_disagree", "clip_frac", "momentum_gap")


def smoke_worker(overrides):
    from megatron_mgrpo.config import load_config
    from megatron_mgrpo.smoke import run_smoke

    cfg = load_config("examples/tiny/smoke.yaml",
                      ["--training.steps", "6", "--training.run_dir", "/tmp/mgrpo-smoke-test",
                       "--parallel.micro_batch_size", "8", *overrides])
    return run_smoke(cfg, log=lambda *_: None)


def bf16_worker():
    from megatron_mgrpo.config import load_config
    from megatron_mgrpo.models.policy import MegatronPolicy
    from megatron_mgrpo.parallel import init_parallel

    cfg = load_config("examples/tiny/smoke.yaml", ["--model.params_dtype", "bf16"])
    policy = MegatronPolicy(cfg, init_parallel(cfg.parallel, seed=cfg.training.seed))
    dtypes = {str(p.dtype) for p in policy.parameters()}
    return dtypes, smoke_worker(["--model.params_dtype", "bf16"])


def reference_then_bf16():
    """The fp32 reference, then the bf16 run, in one process."""
    return smoke_worker([]), bf16_worker()


@pytest.fixture(scope="module")
def one_process():
    return run_workers(reference_then_bf16, 1)[0]


@pytest.fixture(scope="module")
def reference(one_process):
    return one_process[0]


def test_fixed_batch_updates_follow_the_vote(reference):
    """The smoke is the training step over a fixed batch: each step scores the batch with the
    policy it then updates (on-policy, ratio 1 before the single update, nothing clipped), so
    the loss is no learning curve; the log-probs of agreeing and disagreeing completions are."""
    first, last = reference[0], reference[-1]
    for m in reference:
        assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and m["clip_frac"] == 0.0
    # The policy moves probability towards completions that agree with the pseudo-label.
    assert last["logp_agree"] > first["logp_agree"] + 0.05
    assert last["logp_disagree"] < first["logp_disagree"] - 0.05
    # The vote is fixed on a fixed batch: rewards and agreement do not drift.
    assert {round(m["reward_mean"], 9) for m in reference} == {round(first["reward_mean"], 9)}
    # The momentum model trails the policy: never equal after the first step, and the gap grows
    # while the policy keeps moving in the same direction.
    assert 0 < first["momentum_gap"] < last["momentum_gap"]


LAYOUTS = {"tp2": ["--parallel.tensor_parallel", "2"],
           "dp2": ["--parallel.use_distributed_optimizer", "true"]}  # world 2 at TP=1: DP=2


@pytest.fixture(scope="module")
def two_processes():
    """Both layouts' runs, one after the other in the same two processes."""
    ranks = run_workers(in_turn, 2, smoke_worker, [(o,) for o in LAYOUTS.values()])
    return {name: [runs[i] for runs in ranks] for i, name in enumerate(LAYOUTS)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_layouts_reproduce_tp1(reference, two_processes, layout):
    for run in two_processes[layout]:
        for got, want in zip(run, reference):
            for k in KEYS:
                assert got[k] == pytest.approx(want[k], rel=2e-4, abs=2e-5), (got["step"], k)

def test_bf16_policy_is_all_bf16_and_tracks_fp32(one_process):
    reference, (dtypes, run) = one_process
    assert dtypes == {"torch.bfloat16"}  # norms included (Float16Module), as megatron trains
    assert run[-1]["logp_agree"] > run[0]["logp_agree"] + 0.05
    for got, want in zip(run, reference):
        # bf16 has ~3 significant digits: the same trajectory, to within bf16 rounding.
        assert got["loss"] == pytest.approx(want["loss"], abs=5e-3)
        assert got["logp_agree"] == pytest.approx(want["logp_agree"], abs=2e-2)
        assert got["entropy_mean"] == pytest.approx(want["entropy_mean"], abs=2e-2)
