"""TP=2, PP=2 (plain and with a virtual pipeline) and DP=2 (distributed optimizer) against
TP=1 on the same weights and batch.

Every run is real megatron-core over gloo in spawned processes. The reference is the TP=1,
PP=1, DP=1 run of the same model; the others load its initial weights, so log-probs,
entropies, loss, gradients and the weights after optimizer steps must agree (fp32).
"""

import pytest
import torch

from tests.distributed import in_turn, run_workers

MODELS = {
    # GQA + QK-norm, a vocabulary that TP=2 must pad (101 -> 102), untied output layer.
    "qwen3": dict(architecture="qwen3", vocab_size=101, hidden_size=64, intermediate_size=96,
                  num_layers=2, num_attention_heads=4, num_key_value_heads=2),
    # QKV bias, tied embeddings (the last PP stage holds a copy of the embedding).
    "qwen2": dict(architecture="qwen2", vocab_size=96, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  tie_word_embeddings=True),
    # Llama 3 with RoPE scaling, MHA.
    "llama": dict(architecture="llama", vocab_size=80, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_attention_heads=4,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                    high_freq_factor=4.0, original_max_position_embeddings=8)),
}
# Four layers, so PP=2 x virtual pipeline 2 gives each model chunk one layer.
MODELS["qwen3_4l"] = dict(MODELS["qwen3"], num_layers=4)
MODELS["qwen2_4l"] = dict(MODELS["qwen2"], num_layers=4)


LR = 1e-2
# Weights after Adam steps agree to a small share of one step's size.
WEIGHT_ATOL = 1e-2 * LR


def make_batch(vocab: int, batch: int = 6, seq: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.zeros(batch, seq)
    for i in range(batch):  # prompts of different lengths, some right padding
        start, end = 3 + i % 4, seq - (i % 3) * 2
        mask[i, start:end] = 1
    return {
        "input_ids": ids,
        "loss_mask": mask,
        "advantages": torch.randn(batch, generator=g),
        "old_logprobs": -4.5 + 0.1 * torch.randn(batch, seq, generator=g),
    }


def pg_loss(lp, ent, micro):
    """A policy-gradient surrogate with an entropy term, so the TP reductions of both the
    log-probs and the entropy are exercised in the backward."""
    mask = micro["loss_mask"]
    ratio = torch.exp(lp - micro["old_logprobs"])
    per_token = -(micro["advantages"][:, None] * ratio) - 0.1 * ent
    return (per_token * mask).sum(), mask.sum(), {"ratio": (ratio * mask).sum()}


def policy_worker(model_kw, tp, pp, dist_opt, full_sd, batch, steps, recompute="none", vpp=1):
    from megatron_mgrpo.config.schema import Config, ModelConfig, ParallelConfig
    from megatron_mgrpo.models.policy import MegatronPolicy
    from megatron_mgrpo.parallel import init_parallel
    from megatron_mgrpo.weights.megatron_layout import named_global_parameters

    cfg = Config(model=ModelConfig(**model_kw),
                 parallel=ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp,
                                         micro_batch_size=2, use_distributed_optimizer=dist_opt,
                                         recompute=recompute, virtual_pipeline=vpp))
    cfg.optimizer.lr = LR
    # Adam turns a gradient at fp-noise level (rows of rarely seen tokens) into a full +-lr
    # step; eps well above that noise keeps the comparison about the maths, not rounding.
    cfg.optimizer.adam_eps = 1e-6
    ctx = init_parallel(cfg.parallel, seed=7)
    policy = MegatronPolicy(cfg, ctx, total_steps=steps)
    if full_sd is not None:
        policy.load_full_state_dict(full_sd)
    out = {"init": policy.full_state_dict(), "dp_rank": ctx.dp_rank,
           "chunks": [sorted(n for n, _ in named_global_parameters(c)) for c in policy.chunks]}
    local = {k: v.chunk(ctx.dp_size)[ctx.dp_rank] for k, v in batch.items()}
    out["logprobs"], out["entropy"] = policy.logprobs(local)
    lp_only, no_entropy = policy.logprobs(local, with_entropy=False)
    assert no_entropy is None and torch.equal(lp_only, out["logprobs"])
    out["loss"], out["num_tokens"], out["metrics"] = policy.compute_grads(
        local, pg_loss, with_entropy=True)
    if ctx.dp_size == 1:  # with DP > 1 the distributed optimizer holds reduce-scattered shards
        out["grads"] = policy.full_state_dict(grads=True)
    out["steps"] = [policy.train_step(local, pg_loss, with_entropy=True) for _ in range(steps)]
    out["final"] = policy.full_state_dict()
    return out


@pytest.fixture(scope="module")
def references():
    """TP=1 PP=1 DP=1 runs, one per model, one after another in one process (shared by the
    tests): name -> (run, batch)."""
    names = ["qwen3", "llama", "qwen2", "qwen3_4l", "qwen2_4l"]
    batches = [make_batch(MODELS[name]["vocab_size"]) for name in names]
    (refs,) = run_workers(in_turn, 1, policy_worker,
                          [(MODELS[name], 1, 1, False, None, batch, 2)
                           for name, batch in zip(names, batches)])
    return {name: (ref, batch) for name, ref, batch in zip(names, refs, batches)}


# The two-process runs: model, TP, PP, distributed optimizer, recompute, virtual pipeline.
TWO_PROCESSES = {
    "tp2-qwen3": ("qwen3", 2, 1, False, "none", 1),
    "tp2-llama": ("llama", 2, 1, False, "none", 1),
    "pp2-qwen3": ("qwen3", 1, 2, False, "none", 1),
    "pp2-qwen2": ("qwen2", 1, 2, False, "none", 1),
    "dp2-qwen3": ("qwen3", 1, 1, True, "none", 1),
    "recompute-selective": ("qwen3", 2, 1, False, "selective", 1),
    "recompute-full": ("qwen3", 2, 1, False, "full", 1),
    "vpp2-qwen3_4l": ("qwen3_4l", 1, 2, False, "none", 2),
    "vpp2-qwen2_4l": ("qwen2_4l", 1, 2, False, "none", 2),
}


@pytest.fixture(scope="module")
def two_processes(references):
    """Every two-process run, one after another in the same two processes (each from its
    reference's initial weights): key -> the two ranks' results."""
    calls = []
    for name, tp, pp, dist_opt, recompute, vpp in TWO_PROCESSES.values():
        ref, batch = references[name]
        calls.append((MODELS[name], tp, pp, dist_opt, ref["init"], batch, 2, recompute, vpp))
    ranks = run_workers(in_turn, 2, policy_worker, calls)
    return {key: [runs[i] for runs in ranks] for i, key in enumerate(TWO_PROCESSES)}


def assert_close_dicts(got, want, atol, rtol, what):
    assert got.keys() == want.keys(), f"{what}: names differ: {set(got) ^ set(want)}"
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=rtol,
                                   msg=lambda m, k=k: f"{what} {k}: {m}")


def check_against(ref, runs, check_grads=True):
    for run in runs:
        torch.testing.assert_close(run["logprobs"], ref["logprobs"], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(run["entropy"], ref["entropy"], atol=2e-5, rtol=1e-5)
        assert run["num_tokens"] == ref["num_tokens"]
        assert run["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)
        if check_grads:
            assert_close_dicts(run["grads"], ref["grads"], atol=1e-6, rtol=1e-4, what="grad")
        for got, want in zip(run["steps"], ref["steps"]):
            assert got.loss == pytest.approx(want.loss, rel=1e-5, abs=1e-6)
            assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-4)
        assert_close_dicts(run["final"], ref["final"], atol=WEIGHT_ATOL, rtol=0, what="weight")


@pytest.mark.parametrize("name", ["qwen3", "llama"])
def test_tensor_parallel_matches_tp1(references, two_processes, name):
    ref, batch = references[name]
    check_against(ref, two_processes[f"tp2-{name}"])


@pytest.mark.parametrize("name", ["qwen3", "qwen2"])
def test_pipeline_parallel_matches_pp1(references, two_processes, name):
    ref, batch = references[name]
    check_against(ref, two_processes[f"pp2-{name}"])


def check_dp2_against(ref, runs, n):
    for run in runs:  # each DP rank saw its half of the batch
        rows = slice(run["dp_rank"] * n // 2, (run["dp_rank"] + 1) * n // 2)
        torch.testing.assert_close(run["logprobs"], ref["logprobs"][rows], atol=2e-5, rtol=1e-5)
        assert run["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert run["num_tokens"] == ref["num_tokens"]
        for got, want in zip(run["steps"], ref["steps"]):
            assert got.loss == pytest.approx(want.loss, rel=1e-5)
            assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-4)
        assert_close_dicts(run["final"], ref["final"], atol=WEIGHT_ATOL, rtol=0, what="weight")


def test_distributed_optimizer_dp2_matches_dp1(references, two_processes):
    ref, batch = references["qwen3"]
    runs = two_processes["dp2-qwen3"]
    check_dp2_against(ref, runs, batch["input_ids"].shape[0])
    # The step really moved the weights (a no-op optimizer would pass the equalities above).
    moved = max((ref["final"][k] - ref["init"][k]).abs().max().item() for k in ref["init"])
    assert moved > 100 * WEIGHT_ATOL


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_activation_recompute_changes_nothing_but_memory(references, two_processes,
                                                       recompute):
    """parallel.recompute reaches megatron-core (TP=2 here): the same log-probs, gradients and
    steps as the TP=1 run that keeps every activation."""
    ref, batch = references["qwen3"]
    check_against(ref, two_processes[f"recompute-{recompute}"])


@pytest.mark.parametrize("name", ["qwen3_4l", "qwen2_4l"])
def test_virtual_pipeline_matches_pp1(references, two_processes, name):
    """PP=2 with two model chunks per stage (the interleaved 1F1B schedule; 3 microbatches
    padded to 4) against the unsplit model; qwen2 ties the embedding across the pipeline."""
    ref, batch = references[name]
    runs = two_processes[f"vpp2-{name}"]
    check_against(ref, runs)
    # Stage 0 holds layers 0 and 2, stage 1 layers 1 and 3 (chunks dealt round robin).
    layers = [[sorted({n.split(".")[2] for n in chunk if n.startswith("decoder.layers.")})
               for chunk in run["chunks"]] for run in runs]
    assert layers == [[["0"], ["2"]], [["1"], ["3"]]]
    assert "embedding.word_embeddings.weight" in runs[0]["chunks"][0]
    assert "decoder.final_layernorm.weight" in runs[1]["chunks"][1]


def test_virtual_pipeline_with_dp2_and_the_distributed_optimizer():
    """PP=2 x 2 model chunks x DP=2 (4 processes): each chunk's grad buffer sharded by the
    distributed optimizer; the same steps and weights as the unsplit model."""
    batch = make_batch(MODELS["qwen3_4l"]["vocab_size"], batch=8)
    (ref,) = run_workers(policy_worker, 1, MODELS["qwen3_4l"], 1, 1, False, None, batch, 2)
    runs = run_workers(policy_worker, 4, MODELS["qwen3_4l"], 1, 2, True, ref["init"], batch, 2,
                       "none", 2)
    check_dp2_against(ref, runs, 8)
