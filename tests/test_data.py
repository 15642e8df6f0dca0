"""The data side: synthetic task, prompt loading and sampling, tokenizers, the warm-up."""

import json
import os
import re
import shutil

import pytest
import torch

from megatron_mgrpo.data.prompts import DataError, PromptSampler, load_prompts
from megatron_mgrpo.data.synthetic import (
    BOXED,
    TaskSpec,
    make_splits,
    solve,
    write_jsonl,
    write_task,
)
from megatron_mgrpo.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    encode_prompt,
    load_tokenizer,
    train_sentencepiece,
)
from megatron_mgrpo.rewards import extract_boxed

EQUATION = re.compile(r"(\d+)([-+*])(\d+)=(\d+)")


# --- the synthetic task ---------------------------------------------------------------------

def test_task_answers_are_right_and_solutions_check_out():
    spec = TaskSpec(min_steps=1, max_steps=3)
    splits = make_splits(n_train=400, n_val=100, seed=3, n_sft=400, spec=spec)
    for split, rows in splits.items():
        for row in rows:
            answer = int(row["answer"])
            assert solve(row["prompt"]) == answer  # recomputed from the text alone
            assert 0 <= answer <= spec.max_value
            equations = EQUATION.findall(row["solution"])
            assert 1 <= len(equations) <= 3
            prev = None
            for a, op, b, c in equations:
                assert int(c) == {"+": int(a) + int(b), "-": int(a) - int(b),
                                  "*": int(a) * int(b)}[op]
                assert 0 <= int(c) <= spec.max_value
                assert prev is None or int(a) == prev  # each step continues from the last
                prev = int(c)
            assert prev == answer  # the equations are always right
            boxed = extract_boxed(row["solution"])
            assert row["solution"].endswith("}") and BOXED in row["solution"]
            if row.get("noisy"):
                assert boxed != row["answer"] and 0 <= int(boxed) <= spec.max_value
            else:
                assert boxed == row["answer"]
    noisy = sum(r["noisy"] for r in splits["sft"]) / len(splits["sft"])
    assert abs(noisy - spec.noise) < 0.1
    assert not any("noisy" in r for r in splits["train"] + splits["val"])


def test_splits_disjoint_and_deterministic(tmp_path):
    a = make_splits(300, 100, seed=7, n_sft=300)
    prompts = [set(r["prompt"] for r in a[s]) for s in ("train", "val", "sft")]
    assert [len(p) for p in prompts] == [300, 100, 300]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    assert make_splits(300, 100, seed=7, n_sft=300) == a
    assert make_splits(300, 100, seed=8, n_sft=300)["val"] != a["val"]
    assert make_splits(50, 100, seed=7)["val"] == a["val"]  # val does not depend on n_train

    paths = write_task(str(tmp_path), n_train=20, n_val=10, seed=7, n_sft=5)
    assert sorted(paths) == ["sft", "train", "val"]
    rows = [json.loads(line) for line in open(paths["val"])]
    assert rows == make_splits(20, 10, seed=7, n_sft=5)["val"]
    assert set(rows[0]) == {"prompt", "answer", "solution"}
    assert json.load(open(tmp_path / "task.json"))["seed"] == 7


# --- tokenizers -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def task_rows():
    return make_splits(1500, 50, seed=11, n_sft=0)


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory, task_rows):
    prefix = str(tmp_path_factory.mktemp("sp") / "tok")
    return train_sentencepiece([r["prompt"] + r["solution"] for r in task_rows["train"]], prefix)


def test_sentencepiece_round_trip_and_boxed_token(sp_tokenizer, task_rows):
    tok = sp_tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    texts = [t for r in task_rows["val"] for t in (r["prompt"], r["solution"])]
    texts += ["unseen: héllo ✓ {x} \n tabs\t and  double  spaces "]  # byte fallback
    for text in texts:
        ids = tok.encode(text)
        assert 0 not in ids  # never <unk>
        assert tok.decode(ids) == text
    boxed = tok.encode(BOXED)
    assert len(boxed) == 1
    assert boxed[0] in tok.encode(" 1+2=3, \\boxed{3}")
    assert len(tok.encode(task_rows["val"][0]["solution"])) <= 28
    assert encode_prompt(tok, "Q: A:") == [tok.bos_id] + tok.encode("Q: A:")
    assert tok.decode([tok.bos_id] + tok.encode("ab") + [tok.eos_id, tok.pad_id]) == "ab"


def test_tokenizer_dirs_load_with_both_backends(sp_tokenizer, task_rows, tmp_path):
    model_dir = tmp_path / "model"
    sp_tokenizer.save(str(model_dir))
    loaded = load_tokenizer(str(model_dir))
    assert isinstance(loaded, SentencePieceTokenizer)
    assert isinstance(load_tokenizer(sp_tokenizer.model_file), SentencePieceTokenizer)

    # The same dir is an HF tokenizer dir too; without our marker, load_tokenizer uses HF.
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    for name in os.listdir(model_dir):
        if name not in ("mgrpo_tokenizer.json", "tokenizer.model"):
            shutil.copy(model_dir / name, hf_dir / name)
    hf = load_tokenizer(str(hf_dir))
    assert isinstance(hf, HFTokenizer)
    assert (hf.bos_id, hf.eos_id, hf.pad_id) == (1, 2, 3)
    assert hf.vocab_size == sp_tokenizer.vocab_size
    for row in task_rows["val"][:20]:
        assert encode_prompt(hf, row["prompt"]) == encode_prompt(sp_tokenizer, row["prompt"])
        assert hf.encode(row["solution"]) == sp_tokenizer.encode(row["solution"])
        assert hf.decode(hf.encode(row["solution"]) + [hf.eos_id]) == row["solution"]

    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))


# --- the prompt loader ----------------------------------------------------------------------

def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_jsonl_bad_rows_are_skipped_and_counted(sp_tokenizer, tmp_path, capsys):
    good = {"prompt": "Q: Ann has 3 pens. How many pens now? A:", "answer": "3"}
    long_prompt = "Q: " + "Ann has 3 pens. " * 20 + "A:"
    lines = [json.dumps(good)] * 5 + [
        '{"prompt": "Q: broken',                        # malformed json
        "[1, 2, 3]",                                   # json, not an object
        "",                                            # blank: not a row
        json.dumps({"answer": "1"}),                   # missing prompt
        json.dumps({"prompt": 5, "answer": "1"}),      # non-string prompt
        json.dumps({"prompt": "   ", "answer": "1"}),  # empty prompt
        json.dumps({"prompt": "Q: x A:"}),             # missing answer
        json.dumps({"prompt": "Q: x A:", "answer": [1]}),  # non-string answer
        json.dumps({"prompt": "Q: x A:", "answer": 42}),   # a number: accepted as "42"
        json.dumps({"prompt": long_prompt, "answer": "3"}),  # over max_prompt_length
    ]
    path = _write_lines(tmp_path / "train.jsonl", lines)
    ps = load_prompts(path, "prompt", "answer", sp_tokenizer, max_prompt_length=32)
    assert len(ps) == 6 and ps.answers[-1] == "42"
    assert ps.num_rows == 14
    assert dict(ps.skipped) == {"malformed json": 2, "missing prompt": 1,
                                "non-string prompt": 1, "empty prompt": 1,
                                "missing answer": 1, "non-string answer": 1,
                                "over max_prompt_length=32": 1}
    assert capsys.readouterr().out.strip() == (
        "train.jsonl: 14 rows, 8 skipped (2 malformed json, 1 empty prompt, 1 missing answer, "
        "1 missing prompt, 1 non-string answer, 1 non-string prompt, "
        "1 over max_prompt_length=32)")
    assert ps[0].prompt_ids == encode_prompt(sp_tokenizer, good["prompt"])
    assert len(ps[0].prompt_ids) <= 32

    # Without answers: only the prompt is checked.
    ps = load_prompts(path, answer_key=None, log=None)
    assert len(ps) == 9 and ps.answers == [None] * 9 and ps.prompt_ids is None


def test_missing_and_empty_files_are_clear_errors(sp_tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file.*prepare_tiny"):
        load_prompts(str(tmp_path / "nope.jsonl"), log=None)
    empty = _write_lines(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match=r"empty\.jsonl: no usable prompts \(empty\.jsonl: 0 rows"):
        load_prompts(empty, log=None)
    wrong_key = _write_lines(tmp_path / "k.jsonl", [json.dumps({"question": "Q?", "answer": 1})])
    with pytest.raises(DataError, match=r"1 missing prompt.*data.prompt_key='prompt'"):
        load_prompts(wrong_key, log=None)
    too_long = _write_lines(tmp_path / "l.jsonl", [json.dumps({"prompt": "Q: " * 50,
                                                               "answer": "1"})])
    with pytest.raises(DataError, match="raise data.max_prompt_length=8"):
        load_prompts(too_long, tokenizer=sp_tokenizer, max_prompt_length=8, log=None)
    with pytest.raises(DataError, match="unknown file type"):
        load_prompts(_write_lines(tmp_path / "x.txt", ["a,b"]), log=None)


def test_parquet_through_datasets(tmp_path):
    import datasets

    rows = [{"prompt": "Q: one A:", "answer": "1"}, {"prompt": "Q: two A:", "answer": "2"},
            {"prompt": None, "answer": "3"}, {"prompt": "", "answer": "4"}]
    path = str(tmp_path / "train.parquet")
    datasets.Dataset.from_list(rows).to_parquet(path)
    ps = load_prompts(path, log=None)
    assert ps.prompts == ["Q: one A:", "Q: two A:"] and ps.answers == ["1", "2"]
    assert dict(ps.skipped) == {"missing prompt": 1, "empty prompt": 1}


def test_only_newline_ends_a_jsonl_row(tmp_path, capsys):
    """U+2028, U+2029, U+0085, \\x0b, \\x0c and \\x1c-\\x1e are line breaks to str.splitlines,
    not to JSON lines: a prompt holding them is one row, kept intact; \\r\\n endings are fine."""
    odd = "Q: a\u2028b\u2029c\u0085d A:"
    rows = [{"prompt": odd, "answer": "1"}, {"prompt": "Q: two A:", "answer": "2"}]
    path = tmp_path / "odd.jsonl"
    path.write_bytes(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\r\n"
                              for r in rows))
    assert "\u2028".encode() in path.read_bytes()  # written raw, not escaped
    ps = load_prompts(str(path))
    assert ps.prompts == [odd, "Q: two A:"] and ps.num_rows == 2 and not ps.skipped
    assert capsys.readouterr().out.strip() == "odd.jsonl: 2 rows, 0 skipped"
    # A raw control character inside a string is not JSON: one malformed row, not two rows.
    path.write_bytes(b'{"prompt": "Q: a\x0cb A:", "answer": "1"}\n'
                     + json.dumps(rows[1]).encode() + b"\n")
    ps = load_prompts(str(path), log=None)
    assert ps.num_rows == 2 and dict(ps.skipped) == {"malformed json": 1}


def test_text_is_strict_utf8_with_the_line_named(tmp_path):
    good = json.dumps({"prompt": "Q: caf\u00e9? A:", "answer": "1"}, ensure_ascii=False)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes((good + "\n" + good + "\n").encode("utf-8")
                       + '{"prompt": "Q: na\u00efve? A:", "answer": "2"}\n'.encode("latin-1"))
    with pytest.raises(DataError) as e:
        load_prompts(str(latin1), log=None)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{latin1}: line 3: not UTF-8 (byte 0xef")
    assert "re-encode the file as UTF-8" in message
    # The same in a JSON array and in a CSV file (which datasets would read through pandas).
    array = tmp_path / "a.json"
    array.write_bytes(b'[\n{"prompt": "Q: na\xefve? A:", "answer": "2"}\n]\n')
    with pytest.raises(DataError, match=r"a\.json: line 2: not UTF-8"):
        load_prompts(str(array), log=None)
    csv = tmp_path / "g.csv"
    csv.write_bytes(b"prompt,answer\nQ: one A:,1\nQ: na\xefve A:,2\n")
    with pytest.raises(DataError, match=r"g\.csv: line 3: not UTF-8"):
        load_prompts(str(csv), log=None)
    # UTF-8 with a byte-order mark is UTF-8.
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + good.encode() + b"\n")
    assert load_prompts(str(bom), log=None).prompts == ["Q: caf\u00e9? A:"]


def test_unreadable_files_are_one_line_errors(tmp_path):
    corrupt = tmp_path / "train.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"train\.parquet: cannot read as parquet") as e:
        load_prompts(str(corrupt), log=None)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="is a directory"):
        load_prompts(str(tmp_path), log=None)
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their permissions")
    locked = tmp_path / "locked.jsonl"
    locked.write_text(json.dumps({"prompt": "Q: A:", "answer": "1"}) + "\n")
    locked.chmod(0)
    with pytest.raises(DataError, match=r"locked\.jsonl: not readable"):
        load_prompts(str(locked), log=None)


def test_validation_prompts_report_their_skips_through_the_session(sp_tokenizer, tmp_path):
    """The validator hands the loader's summary to `session.say` (what the user sees)."""
    from types import SimpleNamespace

    from megatron_mgrpo.evaluation.periodic import Validator

    path = _write_lines(tmp_path / "val.jsonl", [
        json.dumps({"prompt": "Q: 1+1? A:", "answer": "2"}), "not json",
        json.dumps({"answer": "3"})])
    said = []
    session = SimpleNamespace(
        cfg=SimpleNamespace(data=SimpleNamespace(val_path=path, prompt_key="prompt",
                                                 answer_key="answer", max_prompt_length=64,
                                                 chat_template=False),
                            training=SimpleNamespace(max_eval_prompts=0)),
        tokenizer=sp_tokenizer, say=said.append)
    assert len(Validator(session, interval=1).rows) == 1
    assert said == ["val.jsonl: 3 rows, 2 skipped (1 malformed json, 1 missing prompt)"]


# --- the sampler ----------------------------------------------------------------------------

def _prompt_set(tmp_path, n):
    rows = [{"prompt": f"Q: {i} A:", "answer": str(i)} for i in range(n)]
    path = str(tmp_path / "p.jsonl")
    write_jsonl(path, rows)
    return load_prompts(path, log=None)


def test_sampler_epochs_and_resume(tmp_path):
    ps = _prompt_set(tmp_path, 10)
    sampler = PromptSampler(ps, batch_size=4, seed=5, shuffle=True)
    batches = [sampler.next_indices() for _ in range(5)]  # 20 prompts: two full epochs
    flat = [i for b in batches for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # reshuffled per epoch
    assert sampler.state_dict()["epoch"] == 2 and sampler.state_dict()["position"] == 0

    again = PromptSampler(ps, batch_size=4, seed=5)
    assert [again.next_indices() for _ in range(5)] == batches  # deterministic
    assert PromptSampler(ps, 4, seed=6).next_indices() != batches[0]
    assert PromptSampler(ps, 4, seed=5, shuffle=False).next_indices() == [0, 1, 2, 3]

    # Resume in the middle of an epoch: the restored sampler continues identically.
    a = PromptSampler(ps, batch_size=3, seed=9)
    for _ in range(4):
        a.next_indices()
    state = json.loads(json.dumps(a.state_dict()))  # survives a checkpoint round trip
    b = PromptSampler(ps, batch_size=3, seed=9)
    b.load_state_dict(state)
    assert [b.next_indices() for _ in range(7)] == [a.next_indices() for _ in range(7)]
    batch = b.next_batch()
    assert [ex.prompt for ex in batch] == [ps.prompts[ex.index] for ex in batch]
    # peek_batch (the next step's prompts, generated ahead) is next_batch's, and moves nothing,
    # across an epoch's end too (10 prompts, 3 a batch: position 9 wraps).
    for _ in range(5):
        state = b.state_dict()
        peeked = [ex.index for ex in b.peek_batch()]
        assert b.state_dict() == state
        assert [ex.index for ex in b.next_batch()] == peeked

    with pytest.raises(DataError, match="cannot resume"):
        PromptSampler(ps, 3, seed=10).load_state_dict(state)
    with pytest.raises(DataError, match="cannot resume"):
        PromptSampler(_prompt_set(tmp_path, 11), 3, seed=9).load_state_dict(state)


# --- the warm-up ----------------------------------------------------------------------------

def test_warmup_saves_a_loadable_hf_model(sp_tokenizer, task_rows, tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_mgrpo.config.schema import ModelConfig
    from megatron_mgrpo.data.warmup import (
        SFTConfig,
        build_model,
        evaluate,
        sft_examples,
        train_sft,
    )
    from megatron_mgrpo.models.architecture import model_config_from_hf, read_hf_config

    cfg = ModelConfig(architecture="qwen3", vocab_size=sp_tokenizer.vocab_size, hidden_size=32,
                      intermediate_size=64, num_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=128,
                      tie_word_embeddings=True)
    model = build_model(cfg, seed=0)
    examples = sft_examples(task_rows["train"][:64], sp_tokenizer)
    ids, prompt_len = examples[0]
    assert ids[0] == sp_tokenizer.bos_id and ids[-1] == sp_tokenizer.eos_id
    assert prompt_len == len(encode_prompt(sp_tokenizer, task_rows["train"][0]["prompt"]))
    losses = train_sft(model, examples, SFTConfig(steps=8, batch_size=16, lr=1e-2,
                                                  warmup_steps=2), sp_tokenizer.pad_id, log=None)
    assert losses[-1] < losses[0]

    out = tmp_path / "base"
    model.save_pretrained(str(out))
    sp_tokenizer.save(str(out))
    loaded = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert model_config_from_hf(read_hf_config(str(out))).hidden_size == 32
    tok = load_tokenizer(str(out))
    x = torch.tensor([encode_prompt(tok, task_rows["val"][0]["prompt"])])
    torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits)

    metrics = evaluate(loaded, tok, task_rows["val"][:3], k=2, max_new_tokens=6)
    for key in ("greedy", "pass@1", "maj@2", "parsed"):
        assert 0.0 <= metrics[key] <= 1.0
