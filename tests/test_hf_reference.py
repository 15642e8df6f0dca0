"""Our megatron-core policy against transformers' own Llama / Qwen2 / Qwen3 on the same weights.

transformers is the independent reference for the architecture (GQA layout, RoPE and its
llama3 scaling, QKV bias, QK-norm, tied embeddings): its logits give log-probs and entropies by
a plain dense log_softmax, which our vocab-parallel path must reproduce at TP=1 and TP=2.
"""

import pytest
import torch

from megatron_mgrpo.config.schema import ModelConfig
from megatron_mgrpo.models.architecture import hf_config_dict, model_config_from_hf
from megatron_mgrpo.weights.hf_map import (fuse_qkv, hf_to_megatron, megatron_to_hf,
                                           split_qkv)
from tests.distributed import in_turn, run_workers

ARCHS = {
    "llama": dict(architecture="llama", vocab_size=90, hidden_size=48, intermediate_size=80,
                  num_layers=2, num_attention_heads=6, num_key_value_heads=2,
                  rope_theta=500000.0,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                    high_freq_factor=4.0, original_max_position_embeddings=8)),
    "qwen2": dict(architecture="qwen2", vocab_size=91, hidden_size=64, intermediate_size=96,
                  num_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen3": dict(architecture="qwen3", vocab_size=97, hidden_size=64, intermediate_size=96,
                  num_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  rms_norm_eps=1e-6),
}


def hf_model(kw, seed=0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(**hf_config_dict(ModelConfig(**kw)))
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms: make every tensor count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def dense_reference(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    zero = torch.zeros(ids.shape[0], 1)
    return torch.cat([zero, lp], 1), torch.cat([zero, ent], 1)


def megatron_worker(kw, tp, full_sd, ids):
    from megatron_mgrpo.config.schema import Config, ParallelConfig
    from megatron_mgrpo.models.policy import MegatronPolicy
    from megatron_mgrpo.parallel import init_parallel

    cfg = Config(model=ModelConfig(**kw),
                 parallel=ParallelConfig(tensor_parallel=tp, micro_batch_size=2))
    ctx = init_parallel(cfg.parallel)
    policy = MegatronPolicy(cfg, ctx)
    policy.load_full_state_dict(full_sd)
    return policy.logprobs({"input_ids": ids, "loss_mask": torch.ones_like(ids)})


@pytest.fixture(scope="module")
def megatron_logprobs():
    """Every architecture's megatron log-probs and entropies at TP=1 (one process) and TP=2
    (two), the architectures one after another in the same process(es): (arch, tp) -> the
    ranks' results."""
    calls = {}
    for arch, kw in sorted(ARCHS.items()):
        model = hf_model(kw)
        ids = torch.randint(0, kw["vocab_size"], (3, 20),
                            generator=torch.Generator().manual_seed(1))
        calls[arch] = (kw, dict(hf_to_megatron(model.state_dict(), ModelConfig(**kw))), ids)
    out = {}
    for tp in (1, 2):
        ranks = run_workers(in_turn, tp, megatron_worker,
                            [(kw, tp, full, ids) for kw, full, ids in calls.values()])
        for i, arch in enumerate(calls):
            out[arch, tp] = [runs[i] for runs in ranks]
    return out


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_logprobs_and_entropy_match_transformers(megatron_logprobs, arch):
    kw = ARCHS[arch]
    model = hf_model(kw)
    ids = torch.randint(0, kw["vocab_size"], (3, 20), generator=torch.Generator().manual_seed(1))
    want_lp, want_ent = dense_reference(model, ids)
    for tp in (1, 2):
        for lp, ent in megatron_logprobs[arch, tp]:
            torch.testing.assert_close(lp, want_lp, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(ent, want_ent, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_hf_megatron_round_trip_is_bitwise(arch):
    kw = ARCHS[arch]
    hf = {k: v for k, v in hf_model(kw).state_dict().items()}
    if kw.get("tie_word_embeddings"):
        hf.pop("lm_head.weight", None)
    back = dict(megatron_to_hf(dict(hf_to_megatron(hf, ModelConfig(**kw))), ModelConfig(**kw)))
    assert back.keys() == hf.keys()
    for k in hf:
        assert torch.equal(back[k], hf[k]), k


def test_qkv_fusion_groups_heads_by_kv_group():
    # 4 query heads, 2 KV groups, head_dim 1: rows are labelled by hand.
    m = ModelConfig(hidden_size=4, num_attention_heads=4, num_key_value_heads=2, head_dim=1)
    q = torch.tensor([[0.], [1.], [2.], [3.]])   # q heads 0,1 -> group 0; 2,3 -> group 1
    k = torch.tensor([[10.], [11.]])
    v = torch.tensor([[20.], [21.]])
    fused = fuse_qkv(q, k, v, m)
    assert fused.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    back = split_qkv(fused, m)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))


def test_model_config_from_hf_reads_family_defaults():
    d = hf_config_dict(ModelConfig(**ARCHS["qwen3"]))
    m = model_config_from_hf(d)
    assert (m.architecture, m.qk_norm, m.attention_bias, m.head_dim) == ("qwen3", True, False, 32)
    m2 = model_config_from_hf(hf_config_dict(ModelConfig(**ARCHS["qwen2"])))
    assert (m2.attention_bias, m2.qk_norm, m2.tie_word_embeddings) == (True, False, True)
    m3 = model_config_from_hf(hf_config_dict(ModelConfig(**ARCHS["llama"])))
    assert m3.rope_scaling["factor"] == 8.0 and m3.rope_theta == 500000.0
