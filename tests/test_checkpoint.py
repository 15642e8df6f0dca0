"""dist_checkpointing of policy + optimizer + momentum model: a resumed run continues exactly
(same layout) or to fp rounding (saved at TP=1, loaded at TP=2, PP=2 or DP=2; saved with a
virtual pipeline, loaded without)."""

import os

import pytest
import torch

from tests.distributed import in_turn, run_workers
from tests.test_parallel_equivalence import make_batch, pg_loss


def ckpt_worker(run_dir, mode, tp, pp, vpp=1):
    from megatron_mgrpo.checkpoint import latest_step, load_checkpoint, save_checkpoint, step_dir
    from megatron_mgrpo.config import load_config
    from megatron_mgrpo.models.policy import MegatronPolicy
    from megatron_mgrpo.optim.momentum import MomentumSchedule, ShardedMomentum
    from megatron_mgrpo.parallel import init_parallel
    from megatron_mgrpo.weights.megatron_layout import gather_full_state_dict
    from megatron_mgrpo.weights.push import momentum_tensor_of

    cfg = load_config("examples/tiny/smoke.yaml",
                      ["--parallel.tensor_parallel", str(tp), "--parallel.pipeline_parallel",
                       str(pp), "--parallel.micro_batch_size", "2",
                       "--parallel.virtual_pipeline", str(vpp), "--model.num_layers", "4"])
    ctx = init_parallel(cfg.parallel, seed=3)
    policy = MegatronPolicy(cfg, ctx)
    momentum = ShardedMomentum(policy, MomentumSchedule(0.9))
    local = policy.dp_shard(make_batch(cfg.model.vocab_size))
    out = {}
    if mode == "save":
        for step in (1, 2):
            with momentum.fused_into_next_step(step):
                policy.train_step(local, pg_loss, with_entropy=True)
        save_checkpoint(run_dir, 2, policy, momentum, {"data": {"epoch": 1, "position": 5}})
    else:
        out["trainer"] = load_checkpoint(step_dir(run_dir, latest_step(run_dir)), policy,
                                         momentum)
    # Step 3, identical in both runs if everything that matters was restored.
    with momentum.fused_into_next_step(3):
        result = policy.train_step(local, pg_loss, with_entropy=True)
    out.update(loss=result.loss, grad_norm=result.grad_norm,
               weights=policy.full_state_dict(),
               ema=gather_full_state_dict(policy.chunks, ctx, cfg.model.vocab_size,
                                          tensor_of=momentum_tensor_of(momentum)))
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("run"))
    (ref,) = run_workers(ckpt_worker, 1, run_dir, "save", 1, 1)
    return run_dir, ref


def test_resume_same_layout_is_exact(saved):
    run_dir, ref = saved
    (got,) = run_workers(ckpt_worker, 1, run_dir, "load", 1, 1)
    assert got["trainer"]["data"] == {"epoch": 1, "position": 5}
    assert got["trainer"]["step"] == 2
    assert got["loss"] == ref["loss"] and got["grad_norm"] == ref["grad_norm"]
    for k in ref["weights"]:  # Adam's moments and step were restored: bitwise the same update
        assert torch.equal(got["weights"][k], ref["weights"][k]), k
        assert torch.equal(got["ema"][k], ref["ema"][k]), k


LAYOUTS = {"tp2": (2, 1, 1), "pp2": (1, 2, 1), "dp2": (1, 1, 1), "pp2_vpp2": (1, 2, 2)}


@pytest.fixture(scope="module")
def loaded_at_two_processes(saved):
    """The checkpoint loaded at each layout, one after another in the same two processes."""
    run_dir, _ = saved
    ranks = run_workers(in_turn, 2, ckpt_worker, [(run_dir, "load", *layout)
                                                  for layout in LAYOUTS.values()])
    return {name: [runs[i] for runs in ranks] for i, name in enumerate(LAYOUTS)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resume_at_another_layout(saved, loaded_at_two_processes, layout):
    run_dir, ref = saved
    for got in loaded_at_two_processes[layout]:
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
        for k in ref["weights"]:
            torch.testing.assert_close(got["weights"][k], ref["weights"][k], atol=1e-6, rtol=0)
            torch.testing.assert_close(got["ema"][k], ref["ema"][k], atol=1e-6, rtol=0)


def test_incomplete_checkpoint_is_never_latest(saved, tmp_path):
    from megatron_mgrpo.checkpoint import latest_step, step_dir

    run_dir, _ = saved
    assert latest_step(run_dir) == 2
    assert os.path.isdir(step_dir(run_dir, 2)) and not os.path.exists(step_dir(run_dir, 2) + ".tmp")
    assert latest_step(str(tmp_path)) is None


def test_virtual_pipeline_checkpoint_loads_at_pp1(tmp_path):
    """Saved by PP=2 with two model chunks per stage (layers 0, 2 | 1, 3), resumed unsplit:
    the chunks' keys are global, so step 3 is the same step."""
    run_dir = str(tmp_path)
    saved = run_workers(ckpt_worker, 2, run_dir, "save", 1, 2, 2)
    (got,) = run_workers(ckpt_worker, 1, run_dir, "load", 1, 1)
    assert got["trainer"]["step"] == 2
    for ref in saved:
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
        for k in ref["weights"]:
            torch.testing.assert_close(got["weights"][k], ref["weights"][k], atol=1e-6, rtol=0)
            torch.testing.assert_close(got["ema"][k], ref["ema"][k], atol=1e-6, rtol=0)
