"""The embedded engine's own decoder (`rollout.fast_decode`) against transformers' models.

transformers' forward is the reference: for each architecture the trainer builds (Llama with
llama3 RoPE scaling, Qwen2 with QKV bias and tied embeddings, Qwen3 with QK norm), the
decoder's logits over left-padded prompts and a decode, step by step, equal a plain full
forward of each row alone; the engine samples the same completions through either decoder; a
weight update reaches the fused projections; an architecture it does not cover decodes
through transformers.
"""

import pytest
import torch

from megatron_mgrpo.config.schema import ModelConfig
from megatron_mgrpo.models.architecture import hf_config_dict
from megatron_mgrpo.rollout import fast_decode
from megatron_mgrpo.rollout.base import SamplingParams
from megatron_mgrpo.rollout.embedded import EmbeddedEngine
from tests.test_hf_reference import ARCHS, hf_model

PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [11], [12, 13, 14, 15, 16]]


def engine_for(kw, seed=3):
    reference = hf_model(kw, seed=seed)
    engine = EmbeddedEngine(hf_config_dict(ModelConfig(**kw)), sets=("policy",))
    engine.update_weights("policy", [list(reference.state_dict().items())], version=1)
    return engine


def decode_logits(engine, prompts, steps, gen):
    """The fast decoder's logits [B, steps + 1, V] over `prompts` (left-padded) and `steps`
    random tokens after them, and those tokens."""
    ws = engine._sets["policy"]
    b, width = len(prompts), max(map(len, prompts))
    ids = torch.zeros(b, width, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
    dec = fast_decode.Decoder(ws.model, ws.fused, b, width + steps)
    out = [dec.prefill(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))]
    pos = mask.sum(-1)
    tokens = torch.randint(0, engine.config.vocab_size, (b, steps), generator=gen)
    for t in range(steps):
        out.append(dec.step(tokens[:, t], pos + t))
    return torch.stack(out, 1), tokens


@pytest.mark.parametrize("arch", list(ARCHS))
def test_decoder_logits_equal_a_full_forward_of_each_row_alone(arch):
    engine = engine_for(ARCHS[arch])
    assert fast_decode.unsupported(engine.config) is None
    gen = torch.Generator().manual_seed(0)
    logits, tokens = decode_logits(engine, PROMPTS, 6, gen)
    model = engine.hf_model()
    for r, p in enumerate(PROMPTS):
        ids = torch.tensor([p + tokens[r].tolist()])
        with torch.no_grad():
            want = model(input_ids=ids).logits[0, len(p) - 1:]
        torch.testing.assert_close(logits[r], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_the_engine_samples_the_same_completions_through_either_decoder(arch):
    engine = engine_for(ARCHS[arch])
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10,
                            stop_token_ids=[0, 1], seed=5)
    fast = engine.generate(PROMPTS, 3, params)
    engine._sets["policy"].fused = None  # transformers' forward and DynamicCache
    slow = engine.generate(PROMPTS, 3, params)
    for fg, sg in zip(fast, slow):
        for f, s in zip(fg, sg):
            assert f.token_ids == s.token_ids and f.finish_reason == s.finish_reason
            torch.testing.assert_close(torch.tensor(f.logprobs), torch.tensor(s.logprobs),
                                       atol=1e-5, rtol=1e-5)
    assert len({len(c.token_ids) for g in fast for c in g}) > 1  # rows ended at different steps


def test_a_weight_update_reaches_the_fused_projections():
    kw = ARCHS["qwen2"]
    engine = engine_for(kw, seed=3)
    update = hf_model(kw, seed=9).state_dict()
    engine.update_weights("policy", [list(update.items())], version=2)
    ws = engine._sets["policy"]
    layer = ws.model.model.layers[1].self_attn
    # The parameters are views into the fused tensor the decoder reads.
    assert layer.k_proj.weight.data_ptr() > ws.fused[1]["qkv"].data_ptr()
    torch.testing.assert_close(ws.fused[1]["qkv"], torch.cat(
        [update[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"]))
    logits, tokens = decode_logits(engine, PROMPTS[:1], 3, torch.Generator().manual_seed(1))
    fresh = hf_model(kw, seed=9)
    with torch.no_grad():
        want = fresh(input_ids=torch.tensor([PROMPTS[0] + tokens[0].tolist()])).logits[0, 2:]
    torch.testing.assert_close(logits[0], want, atol=1e-5, rtol=1e-5)


def test_an_architecture_it_does_not_cover_decodes_through_transformers():
    kw = dict(ARCHS["llama"], rope_scaling=dict(rope_type="dynamic", factor=2.0))
    config = hf_config_dict(ModelConfig(**kw))
    engine = EmbeddedEngine(config, sets=("policy",))
    assert "dynamic" in fast_decode.unsupported(engine.config)
    assert engine._sets["policy"].fused is None
    params = SamplingParams(temperature=1.0, max_new_tokens=4, seed=1)
    out = engine.generate(PROMPTS[:2], 2, params)
    assert all(len(c.token_ids) == 4 for g in out for c in g)
