"""The live weight push: Megatron policy (TP / PP / DP) -> embedded engine on rank 0.

Every worker loads the same tiny HF model into a Megatron policy, takes two Adam steps (so the
pushed weights are the optimizer's, not the init) and folds them into a momentum EMA; rank 0's
engine then receives the policy and the EMA. The checks: the engine's log-probs equal the
policy's own `policy.logprobs` (fp32), the engine's momentum weights equal the EMA gathered
full, and a push in tiny buckets equals a one-shot push bit for bit.
"""

import pytest
import torch

from megatron_mgrpo.config.schema import ModelConfig
from megatron_mgrpo.weights.push import PushStats, bucketize
from tests.distributed import in_turn, run_workers
from tests.test_fp8_rollout import expected_weights
from tests.test_hf_reference import ARCHS, hf_model

TINY_BUCKET = 4096  # bytes: most tensors go alone, a few small ones share


def _loss(lp, ent, micro):
    mask = micro["loss_mask"]
    return -(lp * mask).sum(), mask.sum(), {}


def _engine_logprobs(engine, model, ids):
    with torch.no_grad():
        logits = engine.hf_model(model)(input_ids=ids).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros(ids.shape[0], 1), lp], 1)


def push_worker(arch, tp, pp, ids, vpp=1):
    from megatron_mgrpo.config.schema import Config, OptimizerConfig, ParallelConfig
    from megatron_mgrpo.models.architecture import hf_config_dict
    from megatron_mgrpo.models.policy import MegatronPolicy
    from megatron_mgrpo.optim.momentum import MomentumSchedule, ShardedMomentum
    from megatron_mgrpo.parallel import init_parallel
    from megatron_mgrpo.rollout.embedded import EmbeddedEngine
    from megatron_mgrpo.weights.hf_map import hf_to_megatron, megatron_to_hf
    from megatron_mgrpo.weights.megatron_layout import gather_full_state_dict
    from megatron_mgrpo.weights.push import momentum_tensor_of, push_weights

    kw = dict(ARCHS[arch], num_layers=4) if vpp > 1 else ARCHS[arch]
    m = ModelConfig(**kw)
    cfg = Config(model=m, optimizer=OptimizerConfig(lr=3e-3),
                 parallel=ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp,
                                         micro_batch_size=2, virtual_pipeline=vpp))
    ctx = init_parallel(cfg.parallel)
    policy = MegatronPolicy(cfg, ctx)
    init = hf_model(kw).state_dict()
    policy.load_full_state_dict(dict(hf_to_megatron(init, m)))
    momentum = ShardedMomentum(policy, MomentumSchedule(momentum=0.5))
    batch = {"input_ids": ids, "loss_mask": torch.ones_like(ids)}
    for step in (1, 2):
        with momentum.fused_into_next_step(step):
            policy.train_step(policy.dp_shard(batch), _loss)

    main = ctx.rank == 0
    engine = EmbeddedEngine(hf_config_dict(m)) if main else None
    out = {}
    out["stats_policy"] = push_weights(engine, policy, "policy", version=1, bucket_bytes=1 << 30)
    out["stats_momentum"] = push_weights(engine, policy, "momentum", version=2,
                                         bucket_bytes=TINY_BUCKET, momentum=momentum)
    lp, _ = policy.logprobs(batch)
    want_policy = dict(megatron_to_hf(policy.full_state_dict(), m))
    want_ema = dict(megatron_to_hf(
        gather_full_state_dict(policy.chunks, ctx, m.vocab_size,
                               momentum_tensor_of(momentum)), m))
    if main:
        out.update(
            megatron_logprobs=lp,
            engine_logprobs=_engine_logprobs(engine, "policy", ids),
            versions=(engine.weight_version("policy"), engine.weight_version("momentum")),
            engine_policy={k: v.clone() for k, v in engine.hf_model("policy").state_dict().items()},
            engine_momentum={k: v.clone()
                             for k, v in engine.hf_model("momentum").state_dict().items()},
            want_policy=want_policy, want_ema=want_ema, init=init)

    # the same policy again, in tiny buckets: bit for bit the one-shot result
    out["stats_tiny"] = push_weights(engine, policy, "policy", version=3,
                                     bucket_bytes=TINY_BUCKET)
    if main:
        out["engine_policy_tiny"] = engine.hf_model("policy").state_dict()

    # FP8 (rollout.weight_format fp8): each stage quantises its own weights; in tiny buckets
    # a weight and its scale must still travel together (the engine refuses them apart)
    fp8_engine = EmbeddedEngine({**hf_config_dict(m), "quantization_config": {
        "quant_method": "fp8", "weight_block_size": [4, 4]}}) if main else None
    out["stats_fp8"] = push_weights(fp8_engine, policy, "policy", version=6,
                                    bucket_bytes=TINY_BUCKET, fp8_block_size=4)
    if main:
        out["engine_fp8"] = fp8_engine.hf_model("policy").state_dict()

    # an engine that rejects the update (wrong shapes): every rank raises, nobody hangs
    bad = EmbeddedEngine(hf_config_dict(ModelConfig(**{**kw, "intermediate_size": 32}))) \
        if main else None
    try:
        push_weights(bad, policy, "policy", version=4, bucket_bytes=TINY_BUCKET)
        out["bad_push_error"] = None
    except Exception as e:  # noqa: BLE001
        out["bad_push_error"] = f"{type(e).__name__}: {e}"
    if main:
        out["bad_version"] = bad.weight_version("policy")
    # ... and the channel is clean afterwards
    push_weights(engine, policy, "policy", version=5, bucket_bytes=TINY_BUCKET)
    if main:
        out["final_version"] = engine.weight_version("policy")
    return out


CASES = [
    ("llama", 1, 1, 1, 2),   # TP=1 with DP=2 (distributed optimizer): only DP rank 0 sends
    ("qwen3", 2, 1, 1, 2),   # TP=2, vocabulary padded for TP, QK-norm
    ("qwen2", 1, 2, 1, 2),   # PP=2, tied embeddings (the last stage's output layer is not sent)
    ("qwen3", 1, 2, 2, 2),   # PP=2 x 2 model chunks: 4 layers, each stage sends 2 apart
]


def push_ids(arch):
    return torch.randint(0, ARCHS[arch]["vocab_size"], (4, 12),
                         generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def pushed():
    """Every case's run, one after another in the same two processes (all have world 2)."""
    assert {world for *_, world in CASES} == {2}
    ranks = run_workers(in_turn, 2, push_worker, [(arch, tp, pp, push_ids(arch), vpp)
                                                  for arch, tp, pp, vpp, _ in CASES])
    return [[runs[i] for runs in ranks] for i in range(len(CASES))]


@pytest.mark.parametrize("arch,tp,pp,vpp,world", CASES)
def test_push_reaches_the_engine(pushed, arch, tp, pp, vpp, world):
    ids = push_ids(arch)
    results = pushed[CASES.index((arch, tp, pp, vpp, world))]
    r = results[0]

    # the pushed weights are the optimizer's, not the init
    assert any(not torch.equal(r["want_policy"][k], r["init"][k]) for k in r["want_policy"])
    # policy: the engine's transformers model scores like the Megatron policy
    torch.testing.assert_close(r["engine_logprobs"], r["megatron_logprobs"], atol=2e-5,
                               rtol=1e-5)
    for k, v in r["want_policy"].items():
        assert torch.equal(r["engine_policy"][k], v), k
    # momentum: the engine holds the EMA gathered full, which is neither the init nor the policy
    assert r["want_ema"].keys() == r["want_policy"].keys()
    for k, v in r["want_ema"].items():
        assert torch.equal(r["engine_momentum"][k], v), k
    assert any(not torch.equal(r["want_ema"][k], r["want_policy"][k]) for k in r["want_ema"])
    assert r["versions"] == (1, 2)
    # tiny buckets: the same weights, many more buckets
    for k, v in r["engine_policy"].items():
        assert torch.equal(r["engine_policy_tiny"][k], v), k
    one, tiny = r["stats_policy"], r["stats_tiny"]
    assert one.buckets == 1 if pp == 1 else one.buckets == pp
    assert tiny.buckets > 10 and (tiny.bytes, tiny.tensors) == (one.bytes, one.tensors)
    assert one.tensors == len(r["want_policy"])
    # a rejected push raises the engine's error on every rank, and the next push works
    for res in results:
        assert res["bad_push_error"] is not None and "shape" in res["bad_push_error"]
    assert r["bad_version"] is None and r["final_version"] == 5
    for res in results[1:]:
        assert isinstance(res["stats_policy"], PushStats)
    # FP8: the engine holds exactly what a tile-by-tile quantiser makes of the policy
    for k, v in expected_weights(r["want_policy"].items(), 4).items():
        assert torch.equal(r["engine_fp8"][k], v), k
    fp8_stats = r["stats_fp8"]
    assert fp8_stats.tensors > one.tensors and fp8_stats.bytes < one.bytes / 2  # 1 B vs 4 B


def test_bucketize_bounds_bucket_sizes():
    ts = [("a", torch.zeros(10)), ("b", torch.zeros(20)), ("c", torch.zeros(100)),
          ("d", torch.zeros(5)), ("e", torch.zeros(5)), ("f", torch.zeros(30))]
    buckets = list(bucketize(iter(ts), bucket_bytes=120))
    assert [[n for n, _ in b] for b in buckets] == [["a", "b"], ["c"], ["d", "e"], ["f"]]
    assert [n for b in buckets for n, _ in b] == [n for n, _ in ts]
    assert list(bucketize(iter(ts), 1 << 20)) == [ts]
    assert [len(b) for b in bucketize(iter(ts), 1)] == [1] * len(ts)
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(bucketize(iter(ts), 0))
