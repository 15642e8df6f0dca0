"""Benchmark loaders on fixtures in each benchmark's public schema, pass@k / maj@k against
hand-computed values, and the harness's grading and reports on scripted completions."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest

from megatron_mgrpo.config import ConfigError, load_config
from megatron_mgrpo.data.prompts import DataError
from megatron_mgrpo.data.tokenizer import encode_prompt, train_sentencepiece
from megatron_mgrpo.eval_metrics import benchmark_scores, pass_at_k
from megatron_mgrpo.evaluation.benchmarks import load_benchmark
from megatron_mgrpo.evaluation.harness import (flat_metrics, format_table, load_configured,
                                               run_benchmarks, save_results)
from megatron_mgrpo.rewards import math_equivalent
from megatron_mgrpo.rollout.base import Completion, RolloutEngine
from tests import DEADLOCK_GUARD_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MATH500 = [
    {"problem": "What is $\\frac{2}{4}$ in lowest terms?", "solution": "It is $\\frac{1}{2}$.",
     "answer": "\\frac{1}{2}", "subject": "Prealgebra", "level": 1,
     "unique_id": "test/prealgebra/101.json"},
    {"problem": "Compute $2+3$.", "solution": "$5$", "answer": "5", "subject": "Algebra",
     "level": 1, "unique_id": "test/algebra/7.json"},
    {"problem": "Find the point where $y=x+1$ meets $y=3x-1$.", "solution": "...",
     "answer": "(1,2)", "subject": "Algebra", "level": 2, "unique_id": "test/algebra/99.json"},
]
# The first two rows of openai/gsm8k's main test split, as released (its parquet: two columns).
GSM8K = [
    {"question": "Janet\u2019s ducks lay 16 eggs per day. She eats three for breakfast every "
                 "morning and bakes muffins for her friends every day with four. She sells the "
                 "remainder at the farmers' market daily for $2 per fresh duck egg. How much in "
                 "dollars does she make every day at the farmers' market?",
     "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = "
               "$<<9*2=18>>18 every day at the farmer\u2019s market.\n#### 18"},
    {"question": "A robe takes 2 bolts of blue fiber and half that much white fiber.  How many "
                 "bolts in total does it take?",
     "answer": "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total amount of fabric is "
               "2+1=<<2+1=3>>3 bolts of fabric\n#### 3"},
]
GPQA_COLUMNS = ["Pre-Revision Question", "Pre-Revision Correct Answer", "Question",
                "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
                "Incorrect Answer 3", "Explanation", "Record ID", "High-level domain",
                "Subdomain"]
GPQA = [
    {"Question": "Which particle mediates the electromagnetic force,\n"
                 "in the \"standard\" model?",
     "Correct Answer": "The photon", "Incorrect Answer 1": "The gluon",
     "Incorrect Answer 2": "The W boson", "Incorrect Answer 3": "The Higgs boson",
     "Record ID": "recA1b2", "High-level domain": "Physics", "Subdomain": "Particle physics"},
    {"Question": "What is the hybridisation of carbon in methane?", "Correct Answer": "sp3",
     "Incorrect Answer 1": "sp2", "Incorrect Answer 2": "sp", "Incorrect Answer 3": "dsp2",
     "Record ID": "recZ9y8", "High-level domain": "Chemistry", "Subdomain": "Organic"},
]


def lcb_row(qid, content, tests, private, starter="", func_name=None, date="2024-09-01"):
    """A row of livecodebench/code_generation_lite as released: public tests as a JSON string,
    private ones base64(zlib(pickle(JSON string)))."""
    import base64
    import pickle
    import zlib

    return {"question_title": qid, "question_content": content, "platform": "atcoder",
            "question_id": qid, "contest_id": "abc300", "contest_date": date + "T00:00:00",
            "starter_code": starter, "difficulty": "easy",
            "public_test_cases": json.dumps(tests),
            "private_test_cases": base64.b64encode(zlib.compress(pickle.dumps(
                json.dumps(private)))).decode(),
            "metadata": json.dumps({"func_name": func_name} if func_name else {})}


LCB = [
    lcb_row("abc300_a", "Read N and M; print N+M.",
            [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}],
            [{"input": "10 20\n", "output": "30\n", "testtype": "stdin"},
             {"input": "-5 5\n", "output": "0\n", "testtype": "stdin"}]),
    lcb_row("3000", "Return the largest element of nums.",
            [{"input": "[1, 5, 2]", "output": "5", "testtype": "functional"}],
            [{"input": "[-3, -1]", "output": "-1", "testtype": "functional"}],
            starter="class Solution:\n    def largest(self, nums: List[int]) -> int:\n        ",
            func_name="largest", date="2025-03-10"),
]
ADD_OK = "Sure.\n```python\nn, m = map(int, input().split())\nprint(n + m)\n```"
ADD_WRONG = "```python\nn, m = map(int, input().split())\nprint(n * m)\n```"
MAX_OK = "```python\nclass Solution:\n    def largest(self, nums):\n        return max(nums)\n```"
# Passes the public test ([1, 5, 2] -> 5), fails the private one.
MAX_PUBLIC_ONLY = ("```python\nclass Solution:\n    def largest(self, nums):\n"
                   "        return 5 if 5 in nums else 0\n```")


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    import datasets

    d = tmp_path_factory.mktemp("eval_data")
    write_jsonl(str(d / "math500.jsonl"), MATH500)
    # HuggingFaceH4/aime_2024: a parquet with an int id and string answers.
    datasets.Dataset.from_list([
        {"id": 60, "problem": "Every morning Aya walks 9 km. How long?", "solution": "...",
         "answer": "204", "url": "https://artofproblemsolving.com/x", "year": "2024"},
        {"id": 61, "problem": "Let $b\\ge 2$ be an integer.", "solution": "...",
         "answer": "211", "url": "https://artofproblemsolving.com/y", "year": "2024"},
    ]).to_parquet(str(d / "aime24.parquet"))
    # opencompass/AIME2025: two jsonl files (parts I and II), `question` and `answer` only.
    write_jsonl(str(d / "aime25" / "aime2025-I.jsonl"),
                [{"question": "Find the sum of all integer bases $b>9$.", "answer": "70"}])
    write_jsonl(str(d / "aime25" / "aime2025-II.jsonl"),
                [{"question": "Six points lie in a straight line.", "answer": 468}])
    datasets.Dataset.from_list(GSM8K).to_parquet(str(d / "gsm8k.parquet"))
    write_jsonl(str(d / "livecodebench" / "test.jsonl"), LCB[:1])  # release files, in order
    write_jsonl(str(d / "livecodebench" / "test2.jsonl"), LCB[1:])
    with open(d / "gpqa_diamond.csv", "w", newline="") as f:  # Idavidrein/gpqa's csv
        w = csv.DictWriter(f, fieldnames=GPQA_COLUMNS)
        w.writeheader()
        for r in GPQA:
            w.writerow({c: r.get(c, "") for c in GPQA_COLUMNS})
    return str(d)


def test_pass_at_k_by_hand_and_against_the_binomial_formula():
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)        # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)       # 1 - C(3,3)/C(5,3)
    assert pass_at_k(4, 3, 2) == 1.0 and pass_at_k(4, 0, 4) == 0.0
    for n in range(1, 12):
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == pytest.approx(c / n)
            for k in range(1, n + 1):
                want = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)
    assert pass_at_k(200, 3, 100) == pytest.approx(1 - math.comb(197, 100) / math.comb(200, 100))
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


# Three problems x four samples, graded by hand (see test_math_scores_by_hand).
SCRIPT = [
    ["so \\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "\\boxed{1/3}", "I ran out of"],
    ["\\boxed{6}", "\\boxed{6}", "\\boxed{5}", "\\boxed{7}"],
    ["\\boxed{(1, 2)}", "\\boxed{(1,2)}", "\\boxed{(2,1)}", "\\boxed{(1,2)}"],
]
CORRECT = [[1, 1, 0, 0], [0, 0, 1, 0], [1, 1, 0, 1]]


def test_benchmark_scores_by_hand():
    answers = [["1/2", "0.5", "1/3", None], ["6", "6", "5", "7"], ["(1,2)", "(1,2)", "(2,1)",
                                                                     "(1,2)"]]
    got = benchmark_scores(CORRECT, [2, 4], answers, math_equivalent)
    assert got["pass@1"] == pytest.approx((2 / 4 + 1 / 4 + 3 / 4) / 3)
    # columns 2/3, 2/3, 1/3, 1/3: variance 1/27 (ddof 1), standard error sqrt(1/27 / 4)
    assert got["pass@1_se"] == pytest.approx(math.sqrt(1 / 108))
    assert got["pass@2"] == pytest.approx((5 / 6 + 1 / 2 + 1) / 3)
    assert got["pass@4"] == 1.0
    assert got["maj@4"] == pytest.approx(2 / 3)  # 1/2 (2 votes) right, 6 wrong, (1,2) right
    only = benchmark_scores([[1], [0]])
    assert only == {"pass@1": 0.5, "pass@1_se": 0.0}
    with pytest.raises(ValueError, match="same number"):
        benchmark_scores([[1, 0], [1]])
    with pytest.raises(ValueError, match="pass@5 needs at least 5"):
        benchmark_scores(CORRECT, [3, 5])


def test_loaders_read_each_public_schema(data_dir):
    math500 = load_benchmark("math500", data_dir)
    assert [p.id for p in math500.problems] == [r["unique_id"] for r in MATH500]
    assert [p.answer for p in math500.problems] == [r["answer"] for r in MATH500]
    assert math500.problems[1].prompt == ("Compute $2+3$.\nPlease reason step by step, and put "
                                       "your final answer within \\boxed{}.")
    aime = load_benchmark("aime24", data_dir)
    assert [(p.id, p.answer) for p in aime.problems] == [("60", "204"), ("61", "211")]
    aime25 = load_benchmark("aime25", data_dir)
    assert [p.answer for p in aime25.problems] == ["70", "468"]  # parts I then II; int -> text
    assert aime25.problems[0].id == "row0" and len(aime25.files) == 2
    gsm8k = load_benchmark("gsm8k", data_dir)
    assert gsm8k.grader == "final_number"
    assert [(p.id, p.answer) for p in gsm8k.problems] == [("row0", "18"), ("row1", "3")]
    assert gsm8k.problems[1].prompt == (GSM8K[1]["question"]
                                        + "\nGive the final answer as a number.")
    gpqa = load_benchmark("gpqa_diamond", data_dir)
    assert [p.id for p in gpqa.problems] == ["recA1b2", "recZ9y8"]
    for p, row in zip(gpqa.problems, GPQA):
        assert row["Question"] in p.prompt  # the newline and quotes survive the csv
        lines = {line[0]: line[3:] for line in p.prompt.splitlines()
                 if line[:3] in ("A) ", "B) ", "C) ", "D) ")}
        assert sorted(lines.values()) == sorted(row[c] for c in GPQA_COLUMNS[3:7])
        assert lines[p.answer] == row["Correct Answer"]
    # The option order is a function of (seed, Record ID): fixed per seed, varies across seeds.
    assert [p.prompt for p in load_benchmark("gpqa_diamond", data_dir).problems] == \
        [p.prompt for p in gpqa.problems]
    orders = {tuple(p.prompt for p in load_benchmark("gpqa_diamond", data_dir, seed=s).problems)
              for s in range(6)}
    assert len(orders) > 1
    lcb = load_benchmark("livecodebench", data_dir)
    assert [p.id for p in lcb.problems] == ["abc300_a", "3000"]
    stdin, functional = lcb.problems
    assert [t.kind for t in stdin.code.tests] == ["stdin"] * 3  # public, then private
    assert stdin.code.tests[2].input == "-5 5\n" and stdin.code.func_name is None
    assert "Read the inputs from stdin" in stdin.prompt and "Read N and M" in stdin.prompt
    assert functional.code.func_name == "largest" and len(functional.code.tests) == 2
    assert "starter code" in functional.prompt and "def largest(self" in functional.prompt
    assert stdin.answer is None
    window = load_benchmark("livecodebench", data_dir, date_range="2025-01-01:")
    assert [p.id for p in window.problems] == ["3000"] and window.rows == 2
    with pytest.raises(DataError, match="no problems .* within dates :2023-01-01"):
        load_benchmark("livecodebench", data_dir, date_range=":2023-01-01")
    short = load_benchmark("math500", data_dir, template="Q: {problem} A:", max_problems=2)
    assert [p.prompt for p in short.problems] == ["Q: " + r["problem"] + " A:"
                                                  for r in MATH500[:2]]


def test_loader_errors_say_what_to_do(data_dir, tmp_path):
    with pytest.raises(DataError, match=r"gpqa: no data .*gpqa\{\.jsonl.*Idavidrein/gpqa.*"
                                        r"eval\.paths\.gpqa"):
        load_benchmark("gpqa", data_dir)
    with pytest.raises(DataError, match="eval.paths.math500='/nope' does not exist"):
        load_benchmark("math500", data_dir, paths={"math500": "/nope"})
    bad = tmp_path / "math500.jsonl"
    bad.write_text(json.dumps(MATH500[0]) + "\n" + json.dumps({"problem": "no answer"}) + "\n")
    with pytest.raises(DataError, match=r"row 2: no answer column .*MATH-500"):
        load_benchmark("math500", str(tmp_path))
    bad.write_text(json.dumps(MATH500[0]) + "\nnot json\n")
    with pytest.raises(DataError, match="row 2 is not a JSON object"):
        load_benchmark("math500", str(tmp_path))
    with pytest.raises(DataError, match=r"template cannot be filled.*\{problem\}"):
        load_benchmark("math500", data_dir, template="{question}")
    with pytest.raises(DataError, match="unknown benchmark"):
        load_benchmark("mmlu", data_dir)
    (tmp_path / "aime25").mkdir()
    with pytest.raises(DataError, match="holds no"):
        load_benchmark("aime25", str(tmp_path))


class ScriptedEngine(RolloutEngine):
    """Returns given completion texts per prompt: the harness's grading and scoring are checked
    on completions whose grades are known by hand. A text ending in "of" stops at the length
    limit (truncated)."""

    def __init__(self, tokenizer, script):
        self.tok = tokenizer
        self.script = script
        self.calls = []

    def generate(self, prompts, n, params, model="policy"):
        self.calls.append((len(prompts), n, params, model))
        out = []
        for p in prompts:
            texts = self.script[tuple(p)]
            assert len(texts) == n
            out.append([Completion(self.tok.encode(t) + [self.tok.eos_id], [],
                                   "length" if t.endswith("of") else "stop") for t in texts])
        return out

    def update_weights(self, model, buckets, version):
        raise NotImplementedError

    def weight_version(self, model="policy"):
        return None


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [r["problem"] for r in MATH500] + [t for row in SCRIPT for t in row] + \
        [r["Question"] for r in GPQA]
    return train_sentencepiece(texts * 4, str(tmp_path_factory.mktemp("sp") / "tok"),
                               vocab_size=320)


def eval_config(data_dir, *extra):
    return load_config(None, ["--eval.data_dir", data_dir, *extra]).eval


def test_harness_grades_and_scores_scripted_completions(data_dir, tokenizer, tmp_path):
    cfg = eval_config(data_dir, "--eval.benchmarks", "[math500, gpqa_diamond]",
                      "--eval.samples", "4", "--eval.samples_by_benchmark", "{gpqa_diamond: 2}",
                      "--eval.pass_k", "[2, 4]", "--eval.prompts_per_call", "2",
                      "--eval.save_completions", "true")
    benches = load_configured(cfg, log=lambda line: None)
    math500, gpqa = benches
    script = {tuple(encode_prompt(tokenizer, p.prompt)): texts
              for p, texts in zip(math500.problems, SCRIPT)}
    wrong = {"A": "B", "B": "C", "C": "D", "D": "A"}
    g1, g2 = gpqa.problems
    script[tuple(encode_prompt(tokenizer, g1.prompt))] = [f"Answer: {g1.answer}",
                                                          f"Answer: {wrong[g1.answer]}"]
    script[tuple(encode_prompt(tokenizer, g2.prompt))] = [f"The answer is ({g2.answer})",
                                                          f"\\boxed{{{g2.answer}}}"]
    engine = ScriptedEngine(tokenizer, script)
    log = []
    doc = run_benchmarks(engine, tokenizer, benches, cfg, context_length=4096, label="scripted",
                         step=7, log=log.append)
    m = doc["benchmarks"]["math500"]["metrics"]
    assert m["pass@1"] == pytest.approx(0.5) and m["maj@4"] == pytest.approx(2 / 3)
    assert m["pass@2"] == pytest.approx(7 / 9) and m["pass@4"] == 1.0
    assert m["pass@1_se"] == pytest.approx(math.sqrt(1 / 108))
    assert m["answered"] == pytest.approx(11 / 12) and m["truncated"] == pytest.approx(1 / 12)
    assert [r["correct"] for r in doc["benchmarks"]["math500"]["problems"]] == \
        [[bool(x) for x in row] for row in CORRECT]
    g = doc["benchmarks"]["gpqa_diamond"]
    assert g["samples"] == 2 and "pass@4" not in g["metrics"]  # k = 4 > 2 samples: left out
    assert g["metrics"]["pass@1"] == pytest.approx(0.75)
    assert g["metrics"]["maj@2"] == 1.0  # a 1-1 tie goes to the first answer, the right one
    assert g["metrics"]["pass@2"] == 1.0
    # Two prompts per engine call, the configured sampling, the policy's weights.
    assert [c[:2] for c in engine.calls] == [(2, 4), (1, 4), (2, 2)]
    params = engine.calls[0][2]
    assert (params.temperature, params.top_p, params.max_new_tokens, params.seed) == \
        (0.6, 0.95, 2048, 0)
    assert params.stop_token_ids == [tokenizer.eos_id] and engine.calls[0][3] == "policy"

    flat = flat_metrics(doc)
    assert flat["math500/pass@1"] == pytest.approx(0.5) and flat["gpqa_diamond/maj@2"] == 1.0
    table = format_table(doc).splitlines()
    assert table[0].split()[:5] == ["benchmark", "problems", "k", "pass@1", "±se"]
    assert table[2].split()[:4] == ["math500", "3/3", "4", "0.5000"]
    assert table[3].split()[:4] == ["gpqa_diamond", "2/2", "2", "0.7500"]

    path = str(tmp_path / "out" / "step_7.json")
    save_results(doc, path)
    with open(path) as f:
        saved = json.load(f)
    assert saved["step"] == 7 and saved["benchmarks"]["math500"]["metrics"] == m
    assert "completions" not in saved["benchmarks"]["math500"]
    with open(tmp_path / "out" / "step_7.completions.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert [x["benchmark"] for x in lines] == ["math500"] * 3 + ["gpqa_diamond"] * 2
    assert lines[0]["completions"][0].startswith("so \\boxed") and lines[0]["answers"][0] == \
        "\\frac{1}{2}"


def test_code_is_graded_by_running_the_benchmarks_tests(data_dir, tokenizer):
    cfg = eval_config(data_dir, "--eval.benchmarks", "[livecodebench]", "--eval.samples", "3",
                      "--eval.pass_k", "[2]", "--eval.code_workers", "2")
    (bench,) = load_configured(cfg, log=lambda line: None)
    stdin, functional = bench.problems
    cut = "```python\nn, m = map(int, input().split())\nprint(n + m)\n```\nFaster:\n```python\nimp"
    script = {tuple(encode_prompt(tokenizer, stdin.prompt)): [ADD_WRONG, ADD_OK, cut],
              tuple(encode_prompt(tokenizer, functional.prompt)): [MAX_OK, "no code", MAX_OK]}
    log = []
    doc = run_benchmarks(ScriptedEngine(tokenizer, script), tokenizer, [bench], cfg,
                         context_length=4096, log=log.append)
    entry = doc["benchmarks"]["livecodebench"]
    assert [r["correct"] for r in entry["problems"]] == [[False, True, False],
                                                         [True, False, True]]
    assert entry["problems"][0]["cases_passed"] == [0, 3, 0]
    assert entry["problems"][0]["reasons"][0].startswith("test 1 of 3: wrong answer")
    assert entry["problems"][0]["reasons"][2].startswith("the last code block is not closed")
    m = entry["metrics"]
    assert m["pass@1"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert m["pass@2"] == pytest.approx(((1 - 1 / 3) + 1) / 2)  # 1 - C(2,2)/C(3,2); c = 2: 1
    assert "maj@3" not in m  # no answers to vote on in code
    assert m["answered"] == pytest.approx(4 / 6)  # the cut-off and the prose have no program
    assert any("graded 6/6 programs" in line for line in log)
    # The private tests count: a program that passes only the public one is wrong.
    script[tuple(encode_prompt(tokenizer, functional.prompt))][1] = MAX_PUBLIC_ONLY
    doc = run_benchmarks(ScriptedEngine(tokenizer, script), tokenizer, [bench], cfg,
                         context_length=4096, log=log.append)
    record = doc["benchmarks"]["livecodebench"]["problems"][1]
    assert record["cases_passed"] == [2, 1, 2] and record["correct"] == [True, False, True]


def test_prompts_too_long_for_the_context_are_left_out_and_counted(data_dir, tokenizer):
    cfg = eval_config(data_dir, "--eval.benchmarks", "[math500]", "--eval.samples", "4",
                      "--eval.max_new_tokens", "64")
    (bench,) = load_configured(cfg, log=lambda line: None)
    lengths = [len(encode_prompt(tokenizer, p.prompt)) for p in bench.problems]
    limit = sorted(lengths)[1]  # the longest problem does not fit
    longest = lengths.index(max(lengths))
    script = {tuple(encode_prompt(tokenizer, p.prompt)): texts
              for p, texts in zip(bench.problems, SCRIPT)}
    doc = run_benchmarks(ScriptedEngine(tokenizer, script), tokenizer, [bench], cfg,
                         context_length=limit + 64, log=lambda line: None)
    entry = doc["benchmarks"]["math500"]
    assert entry["problems_loaded"] == 3 and entry["problems_scored"] == 2
    assert entry["skipped"] == {f"prompt over {limit} tokens": 1}
    kept = [row for i, row in enumerate(CORRECT) if i != longest]
    assert entry["metrics"]["pass@1"] == pytest.approx(sum(map(sum, kept)) / 8)
    with pytest.raises(ValueError, match="leaves no room"):
        run_benchmarks(None, tokenizer, [bench], cfg, context_length=64)


def test_eval_config_is_checked():
    for args, field in [(["--eval.benchmarks", "[mmlu]"], "eval.benchmarks"),
                        (["--eval.benchmarks", "[aime24, aime24]"], "eval.benchmarks"),
                        (["--eval.samples", "0"], "eval.samples"),
                        (["--eval.samples_by_benchmark", "{aime24: 0}"],
                         "eval.samples_by_benchmark.aime24"),
                        (["--eval.templates", "{mmlu: x}"], "eval.templates"),
                        (["--eval.top_p", "0"], "eval.top_p"),
                        (["--eval.livecodebench_dates", "2024-13-01:"],
                         "eval.livecodebench_dates"),
                        (["--eval.code_timeout_s", "0"], "eval.code_timeout_s")]:
        with pytest.raises(ConfigError, match=field):
            load_config(None, args)


def mgrpo(*args):
    return subprocess.run([sys.executable, "-m", "megatron_mgrpo.cli", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=DEADLOCK_GUARD_S)


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    """A small random HF model with the sentencepiece tokenizer: what `--model` is given."""
    from tests.test_hf_reference import hf_model

    out = str(tmp_path_factory.mktemp("hf_model"))
    hf_model(dict(architecture="qwen2", vocab_size=tokenizer.vocab_size, hidden_size=32,
                  intermediate_size=64, num_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=True), seed=5).save_pretrained(out)
    tokenizer.save(out)
    return out


def test_eval_of_an_hf_directory_samples_what_the_engine_samples(model_dir, data_dir, tmp_path):
    """`mgrpo eval --model DIR` end to end through the real embedded engine: its saved
    completions are exactly the engine's own for the configured seed and sampling, and its
    scores follow from its per-problem grades."""
    from megatron_mgrpo.data.tokenizer import load_tokenizer
    from megatron_mgrpo.rewards import get_grader
    from megatron_mgrpo.rollout.base import SamplingParams
    from megatron_mgrpo.rollout.embedded import EmbeddedEngine

    out = tmp_path / "out"
    run = mgrpo("eval", "--model", model_dir, "--benchmarks", "math500,aime24",
                "--eval.data_dir", data_dir, "--eval.samples", "3", "--eval.pass_k", "[2]",
                "--eval.max_new_tokens", "12", "--eval.temperature", "1.0", "--eval.seed", "9",
                "--eval.save_completions", "true", "--eval.output_dir", str(out))
    assert run.returncode == 0, run.stderr
    assert "math500         3/3  3" in run.stdout and "aime24" in run.stdout
    name = os.path.basename(model_dir)
    with open(out / f"{name}.json") as f:
        doc = json.load(f)
    with open(out / f"{name}.completions.jsonl") as f:
        saved = [json.loads(line) for line in f]
    tok = load_tokenizer(model_dir)
    engine = EmbeddedEngine.from_pretrained(model_dir, sets=("policy",))
    grader = get_grader("math")
    for bench in ("math500", "aime24"):
        problems = load_benchmark(bench, data_dir).problems
        groups = engine.generate([encode_prompt(tok, p.prompt) for p in problems], 3,
                                 SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=12,
                                                stop_token_ids=[tok.eos_id], seed=9))
        texts = [[tok.decode(c.token_ids) for c in g] for g in groups]
        records = [r for r in saved if r["benchmark"] == bench]
        assert [r["completions"] for r in records] == texts
        correct = [[a is not None and math_equivalent(p.answer, a)
                    for a in map(grader.extract, t)] for p, t in zip(problems, texts)]
        assert [r["correct"] for r in records] == correct
        m = doc["benchmarks"][bench]["metrics"]
        assert m["pass@1"] == pytest.approx(sum(map(sum, correct)) / (3 * len(problems)))
        lengths = [len(c.token_ids) for g in groups for c in g]
        assert m["completion_tokens"] == pytest.approx(sum(lengths) / len(lengths))
        assert m["truncated"] == pytest.approx(
            sum(c.finish_reason == "length" for g in groups for c in g) / len(lengths))


def test_eval_command_errors_are_one_line(model_dir, tmp_path):
    cases = [
        (("eval", "--benchmarks", "math500"), "eval needs a CONFIG, or --model HF_DIR"),
        (("eval", "--model", str(tmp_path), "--benchmarks", "math500"),
         "no HF model directory (config.json)"),
        (("eval", "--model", model_dir, "--benchmarks", "mmlu"),
         "config error: eval.benchmarks: got 'mmlu'"),
        (("eval", "--model", model_dir), "eval.benchmarks: got []"),
        (("eval", "--model", model_dir, "--benchmarks", "gpqa", "--eval.data_dir",
          str(tmp_path)), "eval.max_new_tokens: got 2048; accepted: less than "
                          "model.max_position_embeddings=512"),
        (("eval", "--model", model_dir, "--benchmarks", "gpqa", "--eval.data_dir",
          str(tmp_path), "--eval.max_new_tokens", "64"), "data error: gpqa: no data"),
    ]
    for args, message in cases:
        run = mgrpo(*args)
        assert run.returncode == 2 and message in run.stderr, (args, run.stderr)
        assert "Traceback" not in run.stderr


def test_chat_template_wraps_the_prompt_as_one_user_message(tokenizer, tmp_path):
    from megatron_mgrpo.data.tokenizer import HFTokenizer, TokenizerError

    hf = tokenizer.to_hf()
    hf.chat_template = ("{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    hf.save_pretrained(str(tmp_path))
    chat = HFTokenizer(str(tmp_path))
    ids = encode_prompt(chat, "Compute $2+3$.", chat_template=True)
    assert chat.decode(ids) == "<|user|>Compute $2+3$.<|assistant|>"
    with pytest.raises(TokenizerError, match="no chat template"):
        encode_prompt(tokenizer, "Compute $2+3$.", chat_template=True)
