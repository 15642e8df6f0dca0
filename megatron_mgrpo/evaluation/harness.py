"""Benchmark runs: sample k completions per problem through the rollout engine, grade, score.

    benches = [load_benchmark(name, cfg.data_dir, cfg.paths, ...) for name in cfg.benchmarks]
    results = run_benchmarks(engine, tokenizer, benches, cfg, context_length=4096)
    save_results(results, "runs/x/eval/step_100.json"); print(format_table(results))

One place decides how a completion is judged, per grader: `math` extracts the last \\boxed{}
answer and compares by equivalence (math-verify), `final_number` reads the final number (GSM8K;
`rewards.final_number`) and compares the same way, `multiple_choice` extracts the option letter,
`code` runs the benchmark's tests in the sandbox (`rewards.code.grade_code`, `code_workers` at a
time). Scores are `eval_metrics.benchmark_scores`: pass@1 averaged over the k samples with its
standard error, unbiased pass@k, and maj@k for graders with answers to vote on. Every figure
is reported with the number of problems it is over and the share of truncated completions, so a
score dragged down by max_new_tokens shows as such.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from megatron_mgrpo.data.tokenizer import Tokenizer, encode_prompt
from megatron_mgrpo.eval_metrics import benchmark_scores
from megatron_mgrpo.evaluation.benchmarks import Benchmark, EvalProblem, load_benchmark

__all__ = ["load_configured", "run_benchmarks", "flat_metrics", "format_table",
           "save_results", "output_dir", "report"]


def load_configured(cfg, log: Callable[[str], None] = print) -> List[Benchmark]:
    """The benchmarks an `EvalConfig` names, loaded (DataError on a missing or bad file)."""
    out = []
    for name in cfg.benchmarks:
        bench = load_benchmark(name, cfg.data_dir, cfg.paths, cfg.templates.get(name), cfg.seed,
                               cfg.max_problems,
                               cfg.livecodebench_dates if name == "livecodebench" else None)
        log(f"eval: {name}: {len(bench.problems)} problems from {', '.join(bench.files)}")
        out.append(bench)
    return out


def _grade_code(problems: Sequence[EvalProblem], texts: Sequence[Sequence[str]], timeout_s: float,
                workers: int, log: Callable[[str], None], name: str):
    from megatron_mgrpo.rewards.code import grade_code

    jobs = [(p, j) for p in range(len(problems)) for j in range(len(texts[p]))]
    verdicts: Dict[Tuple[int, int], Any] = {}
    t0, every = time.time(), max(1, len(jobs) // 10)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(grade_code, texts[p][j], problems[p].code, timeout_s): (p, j)
                   for p, j in jobs}
        for done, future in enumerate(as_completed(futures), 1):
            verdicts[futures[future]] = future.result()
            if done % every == 0 or done == len(jobs):
                log(f"eval: {name}: graded {done}/{len(jobs)} programs "
                    f"({time.time() - t0:.0f} s)")
    return [[verdicts[p, j] for j in range(len(texts[p]))] for p in range(len(problems))]


def run_benchmarks(engine, tokenizer: Tokenizer, benchmarks: Sequence[Benchmark], cfg,
                   context_length: int, model: str = "policy", label: str = "",
                   step: Optional[int] = None, log: Callable[[str], None] = print
                   ) -> Dict[str, Any]:
    """Sample, grade and score each benchmark with weight set `model` of `engine`; returns the
    results document (what `save_results` writes). `cfg` is an `EvalConfig`; `context_length`
    the model's, which bounds prompt + max_new_tokens."""
    from megatron_mgrpo.rollout.base import SamplingParams

    limit = cfg.max_prompt_length or context_length - cfg.max_new_tokens
    if limit < 1:
        raise ValueError(f"eval.max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt "
                         f"in the model's context of {context_length} tokens")
    doc: Dict[str, Any] = {
        "model": label, "step": step,
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p,
                     "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed,
                     "chat_template": cfg.chat_template},
        "benchmarks": {}}
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                            max_new_tokens=cfg.max_new_tokens,
                            stop_token_ids=list(tokenizer.stop_ids), seed=cfg.seed)
    for bench in benchmarks:
        k = cfg.samples_by_benchmark.get(bench.name, cfg.samples)
        kept, ids = [], []
        for p in bench.problems:
            pid = encode_prompt(tokenizer, p.prompt, cfg.chat_template)
            if len(pid) <= limit:
                kept.append(p)
                ids.append(pid)
        left_out = len(bench.problems) - len(kept)
        skipped = {f"prompt over {limit} tokens": left_out} if left_out else {}
        if left_out:
            log(f"eval: {bench.name}: {left_out} problem(s) left out: prompt longer than "
                f"{limit} tokens")
        entry: Dict[str, Any] = {"grader": bench.grader, "files": bench.files, "samples": k,
                                 "problems_loaded": len(bench.problems),
                                 "problems_scored": len(kept), "skipped": skipped}
        doc["benchmarks"][bench.name] = entry
        if not kept:
            entry["metrics"] = {}
            continue
        t0 = time.time()
        groups = []
        for start in range(0, len(kept), cfg.prompts_per_call):
            groups += engine.generate(ids[start:start + cfg.prompts_per_call], k, params,
                                      model=model)
            log(f"eval: {bench.name}: sampled {len(groups)}/{len(kept)} problems x {k} "
                f"({time.time() - t0:.0f} s)")
        texts = [[tokenizer.decode(list(c.token_ids)) for c in comps] for comps in groups]
        entry["sample_time_s"] = time.time() - t0
        entry.update(_score(bench, kept, groups, texts, k, cfg, log))
    return doc


def _score(bench: Benchmark, problems: Sequence[EvalProblem], groups, texts, k: int, cfg,
           log) -> Dict[str, Any]:
    """Grade every completion and reduce to the benchmark's metrics and per-problem records."""
    from megatron_mgrpo.rewards import get_grader
    from megatron_mgrpo.rewards.code import extract_code

    records = []
    answers_all: Optional[List[List[Optional[str]]]] = []
    correct_all = []
    if bench.grader == "code":
        verdicts = _grade_code(problems, texts, cfg.code_timeout_s, cfg.code_workers, log,
                               bench.name)
        for p, vs in zip(problems, verdicts):
            correct_all.append([v.passed for v in vs])
            records.append({"id": p.id, "correct": [v.passed for v in vs],
                            "reasons": [v.reason[:300] for v in vs],
                            "cases_passed": [v.cases_passed for v in vs]})
        answers_all = None
        equivalent = None
        answered = [[extract_code(t) is not None for t in row] for row in texts]
    else:
        grader = get_grader(bench.grader)
        equivalent = grader.equivalent
        for p, t in zip(problems, texts):
            answers = [grader.extract(x) for x in t]
            correct = [a is not None and bool(equivalent(p.answer, a)) for a in answers]
            answers_all.append(answers)
            correct_all.append(correct)
            records.append({"id": p.id, "answer": p.answer, "answers": answers,
                            "correct": correct})
        answered = [[a is not None for a in row] for row in answers_all]
    ks = [x for x in cfg.pass_k if x <= k]
    metrics = benchmark_scores(correct_all, ks, answers_all, equivalent)
    flat = [c for comps in groups for c in comps]
    metrics["answered"] = sum(map(sum, answered)) / len(flat)
    metrics["truncated"] = sum(c.finish_reason == "length" for c in flat) / len(flat)
    metrics["completion_tokens"] = sum(len(c.token_ids) for c in flat) / len(flat)
    out: Dict[str, Any] = {"metrics": metrics, "problems": records}
    if cfg.save_completions:
        out["completions"] = texts
    return out


def flat_metrics(doc: Dict[str, Any], prefix: str = "") -> Dict[str, float]:
    """`{"<prefix><benchmark>/<metric>": value}` for logging beside the training metrics."""
    return {f"{prefix}{name}/{key}": float(value)
            for name, entry in doc["benchmarks"].items()
            for key, value in entry.get("metrics", {}).items()}


_FIRST = ("pass@1", "pass@1_se")


def format_table(doc: Dict[str, Any]) -> str:
    """The results as an aligned text table, one row per benchmark."""
    entries = doc["benchmarks"]
    keys: List[str] = []
    for entry in entries.values():
        for key in entry.get("metrics", {}):
            if key not in keys:
                keys.append(key)

    def order(key: str):
        if key in _FIRST:
            return (0, _FIRST.index(key), 0)
        if key.startswith(("maj@", "pass@")):
            return (1, key.startswith("pass@"), int(key.split("@")[1]))
        return (2, 0, 0)

    keys.sort(key=order)
    head = ["benchmark", "problems", "k"] + ["±se" if key == "pass@1_se" else key for key in keys]
    rows = [head]
    for name, entry in entries.items():
        m = entry.get("metrics", {})
        cell = [f"{m[key]:.1f}" if key == "completion_tokens" else f"{m[key]:.4f}"
                if key in m else "-" for key in keys]
        rows.append([name, f"{entry['problems_scored']}/{entry['problems_loaded']}",
                     str(entry["samples"])] + cell)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def save_results(doc: Dict[str, Any], path: str) -> None:
    """Write the results document as JSON; completions (if kept) go to a `.completions.jsonl`
    beside it, one line per problem, so the JSON stays small enough to read."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    slim = json.loads(json.dumps(doc))
    completions = {name: entry.pop("completions") for name, entry in slim["benchmarks"].items()
                   if "completions" in entry}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(slim, f, indent=1)
    os.replace(tmp, path)
    if completions:
        side = os.path.splitext(path)[0] + ".completions.jsonl"
        with open(side, "w") as f:
            for name, texts in completions.items():
                for record, row in zip(slim["benchmarks"][name]["problems"], texts):
                    f.write(json.dumps({"benchmark": name, **record, "completions": row}) + "\n")


def output_dir(cfg) -> str:
    """Where a config's results go: eval.output_dir, else `<training.run_dir>/eval`."""
    return cfg.eval.output_dir or os.path.join(cfg.training.run_dir, "eval")


def report(doc: Dict[str, Any], path: str, log: Callable[[str], None] = print) -> None:
    """Save the results document at `path` and print its table."""
    save_results(doc, path)
    title = doc["model"] + (f" (step {doc['step']})" if doc.get("step") is not None else "")
    log(f"eval: {title}, T={doc['sampling']['temperature']}, "
        f"max_new_tokens={doc['sampling']['max_new_tokens']}")
    for line in format_table(doc).splitlines():
        log(line)
    log(f"eval: results in {path}")
