"""tools/make_arith_tasks.py: the same files every time, distinct problems, and `mgrpo eval`'s
GPQA loader (with the tool's template) and GSM8K loader (its default template) see exactly the
prompt and answer a training run does."""

import json
import os
import subprocess
import sys

from megatron_mgrpo.evaluation.benchmarks import load_benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "make_arith_tasks.py")


def make(out):
    subprocess.run([sys.executable, TOOL, "--out", str(out), "--n", "20", "--n-val", "8"],
                   check=True, capture_output=True)
    return {f: open(os.path.join(str(out), f), "rb").read() for f in sorted(os.listdir(out))}


def test_files_are_deterministic_and_match_the_eval_loader(tmp_path):
    first, again = make(tmp_path / "a"), make(tmp_path / "b")
    assert first == again and len(first) == 12
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        from make_arith_tasks import SETS, TEMPLATE
    finally:
        sys.path.remove(os.path.join(ROOT, "tools"))
    for name in SETS:
        val = [json.loads(x) for x in first[f"{name}_val.jsonl"].splitlines()]
        train = [json.loads(x) for x in first[f"{name}.jsonl"].splitlines()]
        assert len(val) == 8 and len(train) == 20
        assert len({r["Question"] for r in val + train}) == 28
        for r in val + train:
            assert r["prompt"].count(f"{r['answer']}) {r['value']}\n") == 1
        bench = load_benchmark("gpqa_diamond", str(tmp_path),
                               {"gpqa_diamond": str(tmp_path / "a" / f"{name}_val.jsonl")},
                               TEMPLATE, seed=0)
        assert [p.prompt for p in bench.problems] == [r["prompt"] for r in val]
        assert [p.answer for p in bench.problems] == [r["answer"] for r in val]
        open_val = [json.loads(x) for x in first[f"{name}_open_val.jsonl"].splitlines()]
        assert [(r["question"], r["answer"]) for r in open_val] == \
            [(r["Question"], r["value"]) for r in val]
        gsm8k = load_benchmark("gsm8k", str(tmp_path),
                               {"gsm8k": str(tmp_path / "a" / f"{name}_open_val.jsonl")})
        assert [p.prompt for p in gsm8k.problems] == [r["prompt"] for r in open_val]
        assert [(p.id, p.answer) for p in gsm8k.problems] == \
            [(r["id"], r["answer"]) for r in open_val]
