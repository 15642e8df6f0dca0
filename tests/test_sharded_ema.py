"""The momentum model as an EMA sharded like the optimizer state, fused into the Adam step.

References: torch's own AdamW and `algorithm.ema_update_` (bitwise), an EMA computed here on
the full gathered parameters after every step, and the same run at another DP size.
"""

import pytest
import torch

from tests.distributed import run_workers
from tests.test_parallel_equivalence import make_batch, pg_loss
from tests import DEADLOCK_GUARD_S


# ---- AdamEMA against torch.optim.AdamW -----------------------------------------------------

def _params(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


@pytest.mark.parametrize("tile", [7, 1000, 1 << 18])
def test_adam_ema_is_torch_adamw_then_the_ema_bit_for_bit(tile):
    from megatron_mgrpo.algorithm import ema_update_
    from megatron_mgrpo.optim.adam_ema import AdamEMA

    shapes = [(300, 37), (5,), (0,), (7000,), (3, 3)]
    init = _params(shapes, 0)
    a = [t.clone().requires_grad_() for t in init]
    b = [t.clone().requires_grad_() for t in init]

    def groups(ps):
        return [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}]

    ref = torch.optim.AdamW(groups(a), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    fused = AdamEMA.replacing(torch.optim.AdamW(groups(b), lr=1e-2, betas=(0.9, 0.95),
                                                eps=1e-8))
    fused.tile = tile
    ema_ref = [t.clone() for t in init]
    ema = [t.clone() for t in init]
    fused.attach_ema(zip(b, ema))
    for step in range(1, 6):
        for x, y, g in zip(a, b, _params(shapes, step)):
            x.grad, y.grad = g.clone(), g.clone()
        ref.step()
        m = None if step == 3 else 0.9  # step 3 moves the policy only
        if m is not None:
            ema_update_(ema_ref, [x.detach() for x in a], m)
        fused.ema_momentum = m
        fused.step()
        assert fused.ema_updated == (m is not None) and fused.ema_momentum is None
    for x, y, e_ref, e in zip(a, b, ema_ref, ema):
        assert torch.equal(x, y)
        assert torch.equal(e, e_ref)
        assert torch.equal(ref.state[x]["exp_avg_sq"], fused.state[y]["exp_avg_sq"])
        assert float(ref.state[x]["step"]) == float(fused.state[y]["step"]) == 5
    assert all(g["step"] == 5 for g in fused.param_groups)


def test_adam_ema_refuses_what_it_does_not_implement():
    from megatron_mgrpo.optim.adam_ema import AdamEMA

    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="amsgrad"):
        AdamEMA.replacing(torch.optim.AdamW([p], amsgrad=True))
    with pytest.raises(ValueError, match="fp32 of the param's shape"):
        AdamEMA([p]).attach_ema([(p, torch.zeros(3, dtype=torch.bfloat16))])


def test_momentum_schedule_warms_up_linearly():
    from megatron_mgrpo.optim.momentum import MomentumSchedule

    s = MomentumSchedule(0.99, interval=2, warmup_updates=4, warmup_start=0.9)
    got = [s.coefficient(u) for u in range(6)]
    assert got == pytest.approx([0.9, 0.9225, 0.945, 0.9675, 0.99, 0.99], abs=1e-12)
    assert MomentumSchedule(0.5).coefficient(0) == 0.5
    with pytest.raises(ValueError):
        MomentumSchedule(1.0)


# ---- sharded over data-parallel ranks ------------------------------------------------------

SCHEDULE = dict(momentum=0.8, interval=1, warmup_updates=2, warmup_start=0.5)


def ema_worker(dist_opt, dtype, steps, schedule, save_dir=None, load_dir=None):
    from megatron_mgrpo.algorithm import ema_update_
    from megatron_mgrpo.checkpoint import load_checkpoint, save_checkpoint, step_dir
    from megatron_mgrpo.config import load_config
    from megatron_mgrpo.models.policy import MegatronPolicy
    from megatron_mgrpo.optim.momentum import MomentumSchedule, ShardedMomentum
    from megatron_mgrpo.parallel import init_parallel
    from megatron_mgrpo.weights.megatron_layout import gather_full_state_dict
    from megatron_mgrpo.weights.push import momentum_tensor_of

    cfg = load_config("examples/tiny/smoke.yaml", [
        "--parallel.use_distributed_optimizer", str(dist_opt).lower(),
        "--model.params_dtype", dtype, "--parallel.micro_batch_size", "2"])
    ctx = init_parallel(cfg.parallel, seed=3)
    policy = MegatronPolicy(cfg, ctx)
    schedule = MomentumSchedule(**schedule)
    momentum = ShardedMomentum(policy, schedule)
    vocab = cfg.model.vocab_size
    local = policy.dp_shard(make_batch(vocab))
    if load_dir is not None:
        load_checkpoint(step_dir(load_dir, steps), policy, momentum)
    # The reference: Eq. 1 on the full parameters, gathered after every step.
    ref = {k: v.float().clone() for k, v in policy.full_state_dict().items()}
    init = {k: v.clone() for k, v in ref.items()}
    for step in range(1, steps + 1):
        if load_dir is not None:
            break
        m = schedule.coefficient(momentum.updates) if momentum.due(step) else None
        with momentum.fused_into_next_step(step):
            policy.train_step(local, pg_loss, with_entropy=True)
        if m is not None:
            full = policy.full_state_dict()
            ema_update_([ref[k] for k in sorted(ref)], [full[k] for k in sorted(ref)], m)
    if save_dir is not None:
        save_checkpoint(save_dir, steps, policy, momentum)
    gathered = gather_full_state_dict(policy.chunks, ctx, vocab, momentum_tensor_of(momentum))
    return {"ema": gathered, "ref": ref, "init": init, "final": policy.full_state_dict(),
            "updates": momentum.updates,
            "ema_bytes": momentum.nbytes(),
            "params": sum(p.numel() for p in policy.parameters()),
            "dp": ctx.dp_size}


def test_sharded_ema_equals_the_ema_of_the_full_parameters(tmp_path):
    """DP=2, distributed optimizer, fp32, warm-up: after 3 steps the gathered shards equal the
    EMA computed on the full gathered parameters; each rank holds half the EMA bytes."""
    results = run_workers(ema_worker, 2, True, "fp32", 3, SCHEDULE, str(tmp_path))
    for r in results:
        assert r["dp"] == 2 and r["updates"] == 3
        for k in r["ref"]:
            assert torch.equal(r["ema"][k], r["ref"][k]), k
        # It lags: neither the starting weights nor the current ones.
        assert any(not torch.allclose(r["ema"][k], r["init"][k]) for k in r["ref"])
        assert any(not torch.allclose(r["ema"][k], r["final"][k]) for k in r["ref"])
    n = results[0]["params"]
    assert sum(r["ema_bytes"] for r in results) == 4 * n  # every element once, over DP
    for r in results:  # 4 / DP bytes per parameter (up to bucket padding at this tiny size)
        assert r["ema_bytes"] / n == pytest.approx(4 / 2, rel=0.05)


def test_saved_at_dp2_loaded_at_dp1_is_the_same_ema(tmp_path):
    saved = run_workers(ema_worker, 2, True, "fp32", 2, SCHEDULE, str(tmp_path))
    (loaded,) = run_workers(ema_worker, 1, True, "fp32", 2, SCHEDULE, None, str(tmp_path))
    assert loaded["dp"] == 1 and loaded["updates"] == saved[0]["updates"] == 2
    assert loaded["ema_bytes"] == 4 * loaded["params"]
    for k in saved[0]["ema"]:
        assert torch.equal(loaded["ema"][k], saved[0]["ema"][k]), k


def test_update_interval_skips_steps():
    """interval 2 over 3 steps: one update (step 2), with m = warmup_start."""
    schedule = dict(SCHEDULE, interval=2)
    (r,) = run_workers(ema_worker, 1, True, "fp32", 3, schedule)
    assert r["updates"] == 1
    for k in r["ref"]:
        assert torch.equal(r["ema"][k], r["ref"][k]), k


def test_bf16_sharded_ema_equals_the_plain_optimizers():
    """bf16 params at DP=2: the EMA follows the fp32 main params, sharded over the ranks
    (distributed optimizer) or whole on each (plain optimizer): the same EMA, and not the EMA
    of the bf16 weights.

    Not bitwise: the two optimizers sum the squares for the clipping grad norm in a different
    order (per shard then all-reduced, or per tensor), so the clip factor, and with it the fp32
    main params and their EMA, may differ in the last bit (seen on some CPUs: up to 0.4 ulp of
    a tensor's largest element after two steps). The bound, 4 fp32 ulps of the tensor's largest
    element, is still over 100 times smaller than how far the EMA moved and than the gap to
    the EMA of the bf16 weights, both asserted, so a wrong EMA cannot pass."""
    sharded = run_workers(ema_worker, 2, True, "bf16", 2, SCHEDULE)[0]
    plain = run_workers(ema_worker, 2, False, "bf16", 2, SCHEDULE)[0]
    assert plain["ema_bytes"] == 4 * plain["params"]
    assert sharded["ema_bytes"] == pytest.approx(2 * sharded["params"], rel=0.05)
    eps = torch.finfo(torch.float32).eps
    for k in plain["ema"]:
        assert sharded["ema"][k].dtype == torch.float32
        bound = 4 * eps * float(plain["ema"][k].abs().max())
        gap = float((sharded["ema"][k] - plain["ema"][k]).abs().max())
        moved = float((plain["ema"][k] - plain["init"][k]).abs().max())
        assert gap <= bound < moved / 100, (k, gap, bound, moved)
    # The reference EMA of the bf16 weights differs from one of the fp32 main params, by far
    # more than the bound above.
    assert max(float((sharded["ema"][k] - sharded["ref"][k]).abs().max()) /
               float(sharded["ema"][k].abs().max()) for k in sharded["ref"]) > 100 * 4 * eps


# ---- the Triton kernel, under Triton's CPU interpreter -------------------------------------

_TRITON_CHECK = r"""
import json, torch
from megatron_mgrpo.optim.adam_ema import AdamEMA
shapes = [(1500,), (7, 300), (0,), (1024,), (5,)]
def make(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]
init = make(0)
out = {}
for backend in ("foreach", "triton"):
    ps = [t.clone().requires_grad_() for t in init]
    ema = [t.clone() for t in init]
    opt = AdamEMA([{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}],
                  lr=1e-2, betas=(0.9, 0.95), eps=1e-8, backend=backend)
    opt.attach_ema(zip(ps, ema))
    for step in range(1, 4):
        for p, g in zip(ps, make(step)):
            p.grad = g
        opt.ema_momentum = None if step == 2 else 0.9
        opt.step()
    out[backend] = (ps, ema, [opt.state[p]["exp_avg_sq"] for p in ps])
diff = {k: max(float((a - b).detach().abs().max()) if a.numel() else 0.0
               for a, b in zip(out["foreach"][i], out["triton"][i]))
        for i, k in enumerate(("param", "ema", "exp_avg_sq"))}
moved = max(float((a - b.detach()).abs().max()) for a, b in zip(out["triton"][1], init) if a.numel())
print(json.dumps({"diff": diff, "moved": moved}))
"""


def test_triton_kernel_matches_the_foreach_path_under_the_interpreter():
    """Same params, moments and EMA as the reference path (to fp32 rounding) after three steps,
    one of them without the EMA; tensor sizes off the block size, and an empty one."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _TRITON_CHECK], capture_output=True, text=True,
                       cwd=root, timeout=DEADLOCK_GUARD_S,
                       env=dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root))
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["moved"] > 1e-3  # the EMA did move
    for name, d in got["diff"].items():
        assert d <= 1e-6, (name, d)


@pytest.mark.gpu
def test_triton_kernel_on_the_gpu_matches_the_foreach_path():
    from megatron_mgrpo.optim.adam_ema import adam_ema_foreach_
    from megatron_mgrpo.optim.triton_adam_ema import adam_ema_triton_

    pytest.importorskip("triton")
    g = torch.Generator(device="cuda").manual_seed(0)
    n = [3 << 20, 1000, 5]
    ref = [[torch.randn(k, device="cuda", generator=g) for k in n] for _ in range(5)]
    ref[3] = [t.abs() for t in ref[3]]  # exp_avg_sq
    ours = [[t.clone() for t in ts] for ts in ref]
    kw = dict(step=3.0, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
              momentum=0.99)
    adam_ema_foreach_(*ref, **kw)
    adam_ema_triton_(*ours, **kw)
    for a, b in zip(ref, ours):
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, atol=1e-6, rtol=1e-6)
