"""The embedded rollout engine against transformers' own forward of the same model.

The reference for every log-prob is a plain teacher-forced forward of the engine's HF model on
prompt + completion (no padding, no cache) with a dense log_softmax(logits / T).
"""

import pytest
import torch

from megatron_mgrpo.config.schema import ModelConfig
from megatron_mgrpo.models.architecture import hf_config_dict
from megatron_mgrpo.rollout.base import (SamplingParams, WeightsNotReadyError,
                                         WeightUpdateError)
from megatron_mgrpo.rollout.embedded import EmbeddedEngine
from tests.test_hf_reference import hf_model

# Tied embeddings + QKV bias (qwen2) and a small vocabulary, so stop tokens do get hit.
KW = dict(architecture="qwen2", vocab_size=40, hidden_size=64, intermediate_size=96,
          num_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
          tie_word_embeddings=True)
PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [11], [12, 13, 14, 15, 16]]


def make_engine(**kw):
    reference = hf_model(KW, seed=3)
    engine = EmbeddedEngine(hf_config_dict(ModelConfig(**KW)), **kw)
    for name in ("policy", "momentum"):
        engine.update_weights(name, [list(reference.state_dict().items())], version=7)
    return engine


@pytest.fixture(scope="module")
def engine():
    return make_engine()


def teacher_forced(model, prompt, completion, temperature):
    ids = torch.tensor([list(prompt) + list(completion.token_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    dist = torch.log_softmax(logits / (temperature or 1.0), dim=-1)[len(prompt) - 1:-1]
    lp = dist.gather(-1, torch.tensor(completion.token_ids)[:, None]).squeeze(1)
    return lp, dist


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8), (1.3, 1.0)])
def test_logprobs_equal_teacher_forced_forward(engine, temperature, top_p):
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=12,
                            stop_token_ids=[0], seed=11)
    out = engine.generate(PROMPTS, 3, params)
    assert [len(g) for g in out] == [3] * len(PROMPTS)
    for prompt, group in zip(PROMPTS, out):
        for c in group:
            assert len(c.token_ids) == len(c.logprobs) >= 1
            want, _ = teacher_forced(engine.hf_model(), prompt, c, temperature)
            torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=2e-5, rtol=1e-5)


def test_momentum_weight_set_samples_from_its_own_weights():
    engine = make_engine()
    other = hf_model(KW, seed=4)
    engine.update_weights("momentum", [list(other.state_dict().items())], version=8)
    assert (engine.weight_version("policy"), engine.weight_version("momentum")) == (7, 8)
    params = SamplingParams(max_new_tokens=6, seed=2)
    c = engine.generate([PROMPTS[0]], 1, params, model="momentum")[0][0]
    want, _ = teacher_forced(other, PROMPTS[0], c, 1.0)
    torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=2e-5, rtol=1e-5)
    p = engine.generate([PROMPTS[0]], 1, params, model="policy")[0][0]
    assert p.logprobs != c.logprobs


def test_greedy_and_tiny_top_p_follow_the_argmax(engine):
    greedy = engine.generate(PROMPTS, 1, SamplingParams(temperature=0.0, max_new_tokens=8))
    nucleus = engine.generate(PROMPTS, 2, SamplingParams(temperature=0.8, top_p=1e-6,
                                                         max_new_tokens=8, seed=5))
    for prompt, g, n in zip(PROMPTS, greedy, nucleus):
        lp, dist = teacher_forced(engine.hf_model(), prompt, g[0], 0.0)
        assert g[0].token_ids == dist.argmax(-1).tolist()
        torch.testing.assert_close(torch.tensor(g[0].logprobs), lp, atol=2e-5, rtol=1e-5)
        for c in n:  # one-token nucleus: the argmax, but log-probs of the full distribution
            assert c.token_ids == g[0].token_ids
            want, _ = teacher_forced(engine.hf_model(), prompt, c, 0.8)
            torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=2e-5, rtol=1e-5)
            assert max(c.logprobs) < -1e-3  # not the truncated (renormalised) log-prob 0


def test_top_p_samples_only_from_the_nucleus(engine):
    top_p = 0.5
    out = engine.generate(PROMPTS, 4, SamplingParams(temperature=1.0, top_p=top_p,
                                                     max_new_tokens=10, seed=9))
    for prompt, group in zip(PROMPTS, out):
        for c in group:
            _, dist = teacher_forced(engine.hf_model(), prompt, c, 1.0)
            probs = dist.exp()
            for t, tok in enumerate(c.token_ids):
                before = probs[t][probs[t] > probs[t][tok]].sum()  # mass of likelier tokens
                assert before <= top_p + 1e-5


def test_same_seed_same_completions_other_seed_other_completions(engine):
    params = SamplingParams(max_new_tokens=10, stop_token_ids=[0], seed=123)
    a = engine.generate(PROMPTS, 3, params)
    b = engine.generate(PROMPTS, 3, params)
    assert a == b
    c = engine.generate(PROMPTS, 3, SamplingParams(max_new_tokens=10, stop_token_ids=[0],
                                                   seed=124))
    assert [x.token_ids for g in a for x in g] != [x.token_ids for g in c for x in g]
    # the n samples of one prompt are distinct streams
    assert len({tuple(x.token_ids) for x in a[1]}) == 3


def test_completion_depends_on_its_prompt_and_seed_not_the_batch(engine):
    """Left-padded, chunked batches give what each prompt gives alone."""
    params = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=10,
                            stop_token_ids=[0, 1], seed=42)
    batched = engine.generate(PROMPTS, 3, params)
    small = make_engine(max_batch_size=2).generate(PROMPTS[::-1], 3, params)[::-1]
    for i, prompt in enumerate(PROMPTS):
        alone = engine.generate([prompt], 3, params)[0]
        for x, y, z in zip(batched[i], alone, small[i]):
            assert x.token_ids == y.token_ids == z.token_ids
            assert x.finish_reason == y.finish_reason == z.finish_reason
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs),
                                       atol=1e-5, rtol=1e-5)


def test_a_repeated_prompt_gets_fresh_samples(engine):
    params = SamplingParams(max_new_tokens=10, seed=3)
    out = engine.generate([PROMPTS[1], PROMPTS[1]], 2, params)
    alone = engine.generate([PROMPTS[1]], 2, params)[0]
    assert [c.token_ids for c in out[0]] == [c.token_ids for c in alone]
    assert [c.token_ids for c in out[0]] != [c.token_ids for c in out[1]]


def test_stop_tokens_and_length_limit(engine):
    stops = list(range(0, 8))  # a fifth of the vocabulary: most completions stop early
    out = engine.generate(PROMPTS, 8, SamplingParams(max_new_tokens=6, stop_token_ids=stops,
                                                     seed=1))
    reasons = set()
    for group in out:
        for c in group:
            reasons.add(c.finish_reason)
            assert not set(c.token_ids[:-1]) & set(stops)
            if c.finish_reason == "stop":
                assert c.token_ids[-1] in stops and len(c.token_ids) <= 6
            else:
                assert len(c.token_ids) == 6 and c.token_ids[-1] not in stops
    assert reasons == {"stop", "length"}
    for group in engine.generate(PROMPTS, 2, SamplingParams(max_new_tokens=3, seed=1)):
        assert all(len(c.token_ids) == 3 and c.finish_reason == "length" for c in group)


def test_bad_weight_updates_fail_clearly_and_block_generation():
    engine = make_engine()
    good = list(hf_model(KW, seed=5).state_dict().items())
    params = SamplingParams(max_new_tokens=4, seed=0)

    def expect(bucket_list, match):
        with pytest.raises(WeightUpdateError, match=match):
            engine.update_weights("policy", bucket_list, version=9)
        assert engine.weight_version("policy") is None
        with pytest.raises(WeightsNotReadyError, match="did not complete"):
            engine.generate(PROMPTS, 1, params)

    expect([good[:3], [("model.layers.0.self_attn.q_proj.weigth", good[3][1])]],
           "no parameter 'model.layers.0.self_attn.q_proj.weigth'; did you mean")
    name, t = good[0]
    expect([[(name, t[:-1])]], r"has shape .* the model's parameter")
    expect([good[:4], good[2:3]], "sent twice")
    expect([good[:5]], r"ended without \d+ of \d+ parameters")
    # the other weight set is untouched; a complete update makes the set usable again
    assert engine.weight_version("momentum") == 7
    engine.generate(PROMPTS, 1, params, model="momentum")
    engine.update_weights("policy", (b for b in [good[:5], good[5:]]), version=10)
    assert engine.weight_version("policy") == 10
    state = engine.hf_model("policy").state_dict()
    assert all(torch.equal(state[k], v) for k, v in good)
    engine.generate(PROMPTS, 1, params)
    with pytest.raises(ValueError, match="unknown weight set"):
        engine.weight_version("ema")


def test_from_pretrained_offline(tmp_path):
    reference = hf_model(KW, seed=6)
    reference.save_pretrained(tmp_path)
    engine = EmbeddedEngine.from_pretrained(str(tmp_path))
    assert engine.weight_version("policy") is None
    for name in ("policy", "momentum"):
        state = engine.hf_model(name).state_dict()
        assert all(torch.equal(state[k], v) for k, v in reference.state_dict().items())
    engine.generate(PROMPTS, 1, SamplingParams(max_new_tokens=2, seed=0))


def test_sampling_params_and_prompts_are_checked(engine):
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="outside"):
        engine.generate([[1, 40]], 1, SamplingParams(seed=0))
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], 1, SamplingParams(seed=0))
