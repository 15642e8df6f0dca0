"""`data.chat_template`: training prompts rendered as one user turn of the tokenizer's chat
template, token for token what transformers' `apply_chat_template(..., add_generation_prompt=
True)` gives, with no second BOS; off (the default), prompts are [BOS] + the raw text as before.

Checked on SmolLM2-135M-Instruct's tokenizer ($MGRPO_SMOLLM2_DIR, default runs/smollm2; skipped
when absent), whose BOS is the template's own `<|im_start|>`, and on a small tokenizer with a
template built here that also opens with its BOS.
"""

import json
import os

import pytest

from megatron_mgrpo.config import ConfigError, load_config
from megatron_mgrpo.data.prompts import load_prompts
from megatron_mgrpo.data.tokenizer import (HFTokenizer, TokenizerError, encode_prompt,
                                           train_sentencepiece)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2 = os.path.abspath(os.environ.get("MGRPO_SMOLLM2_DIR")
                          or os.path.join(ROOT, "runs", "smollm2"))
TEMPLATE = ("{% for m in messages %}{{ bos_token }}{{ m['role'] }}\n{{ m['content'] }}\n"
            "{% endfor %}{% if add_generation_prompt %}{{ bos_token }}assistant\n{% endif %}")
PROMPTS = ["Ann has 23 pens. She buys 15 more. How many pens now? Put the final answer in "
           "\\boxed{}.", "Compute $2+3$."]


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    return train_sentencepiece(PROMPTS * 20, str(tmp_path_factory.mktemp("sp") / "tok"),
                               vocab_size=300)


@pytest.fixture(scope="module")
def small_chat_dir(sp_tokenizer, tmp_path_factory):
    """An HF tokenizer directory with a chat template that opens every turn with its BOS."""
    hf = sp_tokenizer.to_hf()
    hf.chat_template = TEMPLATE
    out = str(tmp_path_factory.mktemp("chat_tok"))
    hf.save_pretrained(out)
    return out


def chat_dirs():
    yield pytest.param("small", id="small")
    yield pytest.param("smollm2", id="smollm2", marks=pytest.mark.skipif(
        not os.path.isfile(os.path.join(SMOLLM2, "tokenizer_config.json")),
        reason=f"no SmolLM2 tokenizer at {SMOLLM2} (make smollm2)"))


@pytest.fixture(params=list(chat_dirs()))
def chat_dir(request, small_chat_dir):
    return small_chat_dir if request.param == "small" else SMOLLM2


def hf_ids(directory, text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    ids = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                  add_generation_prompt=True)
    return [int(i) for i in (ids["input_ids"] if hasattr(ids, "keys") else ids)], tok


def test_chat_prompt_ids_equal_apply_chat_template(chat_dir):
    tok = HFTokenizer(chat_dir)
    for text in PROMPTS:
        want, hf = hf_ids(chat_dir, text)
        got = encode_prompt(tok, text, chat_template=True)
        assert got == want
        assert got[0] == tok.bos_id and got[1] != tok.bos_id  # the template's start, not two
        assert hf.decode(got).endswith("assistant\n")
        # off: [BOS] + the raw text, as before
        assert encode_prompt(tok, text) == [tok.bos_id] + tok.encode(text)


def test_load_prompts_with_the_chat_template(chat_dir, tmp_path):
    path = str(tmp_path / "train.jsonl")
    with open(path, "w") as f:
        for text in PROMPTS:
            f.write(json.dumps({"problem": text, "answer": "38"}) + "\n")
    tok = HFTokenizer(chat_dir)
    chat = load_prompts(path, "problem", "answer", tok, 512, log=None, chat_template=True)
    assert chat.prompt_ids == [hf_ids(chat_dir, t)[0] for t in PROMPTS]
    raw = load_prompts(path, "problem", "answer", tok, 512, log=None)
    assert raw.prompt_ids == [encode_prompt(tok, t) for t in PROMPTS]
    # max_prompt_length counts the template's tokens: one under the longest drops just it
    limit = max(map(len, chat.prompt_ids)) - 1
    assert max(map(len, raw.prompt_ids)) <= limit
    short = load_prompts(path, "problem", "answer", tok, limit, log=None, chat_template=True)
    assert dict(short.skipped) == {f"over max_prompt_length={limit}": 1}

def test_a_tokenizer_without_a_template_is_one_line(sp_tokenizer, tmp_path):
    with pytest.raises(TokenizerError, match="no chat template"):
        encode_prompt(sp_tokenizer, PROMPTS[0], chat_template=True)
    plain = sp_tokenizer.to_hf()
    plain.save_pretrained(str(tmp_path))
    with pytest.raises(TokenizerError, match="data.chat_template"):
        encode_prompt(HFTokenizer(str(tmp_path)), PROMPTS[0], chat_template=True)


def test_the_data_section_checks_chat_template():
    assert load_config(None, []).data.chat_template is False
    assert load_config(None, ["--data.chat_template", "true"]).data.chat_template is True
    with pytest.raises(ConfigError, match="data.chat_template"):
        load_config(None, ["--data.chat_template", "true", "--data.tokenizer", "tok.model"])
    cfg = load_config(None, [])
    cfg.data.chat_template = "yes"
    with pytest.raises(ConfigError, match="^data.chat_template: got 'yes'"):
        cfg.data.validate("mgrpo")
