"""The paper's benchmarks, read from local files in their public formats, as templated problems.

| name | where to get it (HF hub dataset) | columns read | grader |
| --- | --- | --- | --- |
| math500 | HuggingFaceH4/MATH-500, `test.jsonl` | problem, answer, unique_id | math |
| aime24 | HuggingFaceH4/aime_2024 (parquet) or Maxwell-Jia/AIME_2024 | problem, answer, id | math |
| aime25 | math-ai/aime25, yentinglin/aime_2025 or opencompass/AIME2025 (I and II) | problem or question, answer, id | math |
| gsm8k | openai/gsm8k, `main/test*.parquet` or a jsonl of it | question, answer (its final `#### N`) | final_number |
| gpqa | Idavidrein/gpqa, `gpqa_main.csv` (gated: accept its terms first) | Question, Correct Answer, Incorrect Answer 1-3, Record ID | multiple_choice |
| gpqa_diamond | Idavidrein/gpqa, `gpqa_diamond.csv` | as gpqa | multiple_choice |
| livecodebench | livecodebench/code_generation_lite, `test*.jsonl` | question_content, question_id, starter_code, public/private_test_cases, metadata, contest_date | code |

A benchmark's data is `<data_dir>/<name>.{jsonl,parquet,json,csv}` or every data file in the
directory `<data_dir>/<name>/` (AIME25 and LiveCodeBench come as several files), unless
`paths[name]` names a file or directory. Nothing is downloaded; a missing file is an error that
says where to put it. Column names are matched as listed, then case-insensitively.

Unlike training prompts, a benchmark row that cannot be read is an error, not a skip: dropping
problems would change the denominator of the scores. Only problems whose prompt is too long for
the model are left out, and they are counted in the report.

GPQA's four options are shuffled per question with `random.Random(f"{seed}:{Record ID}")`, so
the correct letter is spread evenly and the same seed gives the same order on every machine.
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from megatron_mgrpo.data.prompts import DataError, read_rows
from megatron_mgrpo.evaluation.catalog import BENCHMARK_NAMES, parse_date_range

__all__ = ["BENCHMARKS", "BenchmarkSpec", "EvalProblem", "Benchmark", "benchmark_files",
           "load_benchmark", "parse_date_range"]

DATA_EXTENSIONS = (".jsonl", ".parquet", ".json", ".csv")

MATH_TEMPLATE = ("{problem}\nPlease reason step by step, and put your final answer within "
                 "\\boxed{{}}.")
# The phrasing under which SmolLM2-135M-Instruct most often ended with a number (README, "A
# label-free task for SmolLM2"); `extract_final_number` also reads "The answer is N" and "#### N".
GSM8K_TEMPLATE = "{question}\nGive the final answer as a number."
# simple-evals' GPQA prompt; `extract_choice` reads its "Answer: X" line.
GPQA_TEMPLATE = ("Answer the following multiple choice question. The last line of your response "
                 "should be of the following format: 'Answer: $LETTER' (without quotes) where "
                 "LETTER is one of ABCD. Think step by step before answering.\n\n{question}\n\n"
                 "A) {A}\nB) {B}\nC) {C}\nD) {D}")
# LiveCodeBench's generic code-generation prompt (its system line leads, as there is no system
# role in a plain prompt).
LCB_TEMPLATE = ("You are an expert Python programmer. You will be given a question (problem "
                "specification) and will generate a correct Python program that matches the "
                "specification and passes all tests.\n\n### Question:\n{question}\n\n{format}"
                "### Answer: (use the provided format with backticks)\n\n")
LCB_STDIN_FORMAT = ("### Format: Read the inputs from stdin solve the problem and write the answer "
                    "to stdout (do not directly test on the sample inputs). Enclose your code "
                    "within delimiters as follows. Ensure that when the python program runs, it "
                    "reads the inputs, runs the algorithm and writes output to STDOUT.\n"
                    "```python\n# YOUR CODE HERE\n```\n\n")
LCB_STARTER_FORMAT = ("### Format: You will use the following starter code to write the solution "
                      "to the problem and enclose your code within delimiters.\n```python\n"
                      "{starter_code}\n```\n\n")


@dataclass(frozen=True)
class EvalProblem:
    """One benchmark problem, ready to sample."""

    id: str
    """The dataset's own id (unique_id, id, Record ID, question_id), else `row<N>`."""
    prompt: str
    """The templated prompt text."""
    answer: Optional[str]
    """The true answer: the answer text (math), the final number (GSM8K) or option letter
    (GPQA); None for code."""
    code: Any = None
    """`rewards.code.CodeProblemTests` of a code problem (its tests), else None."""


@dataclass
class Benchmark:
    """A loaded benchmark."""

    name: str
    grader: str
    """`math`, `final_number`, `multiple_choice` or `code`."""
    files: List[str]
    problems: List[EvalProblem]
    rows: int
    """Rows read from the files (before the date window and max_problems)."""
    skipped: Dict[str, int] = field(default_factory=dict)
    """Reason -> problems left out (prompt too long)."""


@dataclass(frozen=True)
class BenchmarkSpec:
    """How one benchmark's rows become problems."""

    grader: str
    source: str
    """Where to get the files, for the missing-file error."""
    template: str
    convert: Callable[..., Tuple[str, Optional[str], Any, Dict[str, str]]]
    """(row, seed) -> (id, answer, code tests, template fields)."""


def _field(row: Dict[str, Any], names: Sequence[str], what: str, required: bool = True):
    for name in names:
        if row.get(name) is not None:
            return row[name]
    lower = {str(k).lower(): v for k, v in row.items()}
    for name in names:
        if lower.get(name.lower()) is not None:
            return lower[name.lower()]
    if required:
        raise ValueError(f"no {what} column (looked for {', '.join(names)}; the row has "
                         f"{', '.join(map(str, row)) or 'no columns'})")
    return None


def _text(value: Any, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{what} is {type(value).__name__}, not text")
    if isinstance(value, float):
        if value != value:  # NaN: an empty csv cell
            raise ValueError(f"{what} is empty")
        value = int(value) if value.is_integer() else value
    text = str(value).strip()
    if not text:
        raise ValueError(f"{what} is empty")
    return text


def _row_id(row: Dict[str, Any], names: Sequence[str], index: int) -> str:
    value = _field(row, names, "id", required=False)
    return str(value) if value is not None else f"row{index}"


def _math(row: Dict[str, Any], index: int, seed: int):
    problem = _text(_field(row, ("problem", "question"), "problem"), "problem")
    answer = _text(_field(row, ("answer", "expected_answer"), "answer"), "answer")
    return (_row_id(row, ("unique_id", "id", "idx"), index), answer, None,
            {"problem": problem})


def _gsm8k(row: Dict[str, Any], index: int, seed: int):
    question = _text(_field(row, ("question", "problem"), "question"), "question")
    answer = _text(_field(row, ("answer",), "answer"), "answer")
    final = answer.rpartition("####")[2].strip().replace(",", "")  # GSM8K: reasoning, then #### N
    if not final:
        raise ValueError("answer has nothing after its last ####")
    return (_row_id(row, ("id", "idx", "unique_id"), index), final, None, {"question": question})


def _gpqa(row: Dict[str, Any], index: int, seed: int):
    question = _text(_field(row, ("Question",), "Question"), "Question")
    right = _text(_field(row, ("Correct Answer",), "Correct Answer"), "Correct Answer")
    wrong = [_text(_field(row, (f"Incorrect Answer {i}",), f"Incorrect Answer {i}"),
                   f"Incorrect Answer {i}") for i in (1, 2, 3)]
    pid = _row_id(row, ("Record ID", "id"), index)
    options = [right] + wrong
    random.Random(f"{seed}:{pid}").shuffle(options)
    letters = "ABCD"
    return (pid, letters[options.index(right)], None,
            {"question": question, **dict(zip(letters, options))})


def _livecodebench(row: Dict[str, Any], index: int, seed: int):
    from megatron_mgrpo.rewards.code import livecodebench_tests

    question = _text(_field(row, ("question_content",), "question_content"), "question_content")
    tests = livecodebench_tests(row)
    starter = tests.starter_code.strip()
    fmt = LCB_STARTER_FORMAT.format(starter_code=starter) if starter else LCB_STDIN_FORMAT
    return (_row_id(row, ("question_id",), index), None, tests,
            {"question": question, "format": fmt})


_MATH_HINT = "a jsonl/parquet with problem and answer columns"
BENCHMARKS: Dict[str, BenchmarkSpec] = {
    "math500": BenchmarkSpec("math", "HuggingFaceH4/MATH-500 (test.jsonl)", MATH_TEMPLATE, _math),
    "aime24": BenchmarkSpec("math", "HuggingFaceH4/aime_2024 or Maxwell-Jia/AIME_2024 "
                            f"({_MATH_HINT})", MATH_TEMPLATE, _math),
    "aime25": BenchmarkSpec("math", "math-ai/aime25, yentinglin/aime_2025 or opencompass/AIME2025 "
                            f"({_MATH_HINT}; a directory may hold parts I and II)",
                            MATH_TEMPLATE, _math),
    "gsm8k": BenchmarkSpec("final_number", "openai/gsm8k (main/test-*.parquet, or a jsonl with "
                           "question and answer columns)", GSM8K_TEMPLATE, _gsm8k),
    "gpqa": BenchmarkSpec("multiple_choice", "Idavidrein/gpqa (gpqa_main.csv; gated)",
                          GPQA_TEMPLATE, _gpqa),
    "gpqa_diamond": BenchmarkSpec("multiple_choice", "Idavidrein/gpqa (gpqa_diamond.csv; gated)",
                                  GPQA_TEMPLATE, _gpqa),
    "livecodebench": BenchmarkSpec("code", "livecodebench/code_generation_lite (test*.jsonl; a "
                                   "directory of them)", LCB_TEMPLATE, _livecodebench),
}
if tuple(BENCHMARKS) != BENCHMARK_NAMES:  # the names the config accepts are these loaders'
    raise ImportError(f"evaluation.catalog.BENCHMARK_NAMES {BENCHMARK_NAMES} != the loaders "
                      f"{tuple(BENCHMARKS)}")


def benchmark_files(name: str, data_dir: str, paths: Optional[Dict[str, str]] = None
                    ) -> List[str]:
    """The data files of benchmark `name` (see the module docstring); DataError if none."""
    spec = _spec(name)
    given = (paths or {}).get(name)
    candidates = [given] if given else (
        [os.path.join(data_dir, name + ext) for ext in DATA_EXTENSIONS]
        + [os.path.join(data_dir, name)])
    for path in candidates:
        if os.path.isfile(path):
            return [path]
        if os.path.isdir(path):
            files = sorted(os.path.join(path, f) for f in os.listdir(path)
                           if f.lower().endswith(DATA_EXTENSIONS))
            if files:
                return files
            raise DataError(f"{name}: the directory {path} holds no {'/'.join(DATA_EXTENSIONS)} "
                            f"file; put {spec.source} there")
    where = (f"eval.paths.{name}={given!r} does not exist" if given else
             f"looked for {os.path.join(data_dir, name)}{{{','.join(DATA_EXTENSIONS)}}} and the "
             f"directory {os.path.join(data_dir, name)}/")
    raise DataError(f"{name}: no data ({where}). Nothing is downloaded at run time: fetch "
                    f"{spec.source} on a machine with internet (e.g. `huggingface-cli download "
                    f"--repo-type dataset REPO --local-dir DIR`) and put it there, or point "
                    f"eval.paths.{name} at it")


def load_benchmark(name: str, data_dir: str = "data/eval",
                   paths: Optional[Dict[str, str]] = None, template: Optional[str] = None,
                   seed: int = 0, max_problems: int = 0, date_range: Optional[str] = None
                   ) -> Benchmark:
    """Benchmark `name`'s problems, in file order, templated (`template` replaces the default;
    see `EvalConfig.templates` for its fields). `date_range` (`START:END`) keeps the problems
    whose contest_date lies in it (LiveCodeBench). Raises DataError for a missing file, a row
    without the expected columns or a template with unknown fields."""
    spec = _spec(name)
    template = template or spec.template
    window = parse_date_range(date_range) if date_range else None
    files = benchmark_files(name, data_dir, paths)
    problems: List[EvalProblem] = []
    rows = 0
    for path in files:
        file_rows, _ = read_rows(path)
        for i, row in enumerate(file_rows):
            rows += 1
            where = f"{path}, row {i + 1}"
            if row is None:
                raise DataError(f"{name}: {where} is not a JSON object; is this {spec.source}?")
            if window is not None and not _in_window(row, window, where):
                continue
            try:
                pid, answer, code, fields = spec.convert(row, len(problems), seed)
            except ValueError as e:
                raise DataError(f"{name}: {where}: {e}; expected {spec.source}") from None
            try:
                prompt = template.format(**fields)
            except (KeyError, IndexError, ValueError) as e:
                raise DataError(f"{name}: the template cannot be filled ({type(e).__name__}: "
                                f"{e}); its fields are {', '.join('{' + k + '}' for k in fields)}"
                                " (write literal braces as {{ }})") from None
            problems.append(EvalProblem(pid, prompt, answer, code))
    if max_problems:
        problems = problems[:max_problems]
    if not problems:
        raise DataError(f"{name}: no problems in {', '.join(files)}"
                        + (f" within dates {date_range}" if date_range else ""))
    return Benchmark(name, spec.grader, files, problems, rows)


def _in_window(row: Dict[str, Any], window, where: str) -> bool:
    value = row.get("contest_date")
    try:
        day = datetime.date.fromisoformat(str(value)[:10])
    except ValueError:
        raise DataError(f"{where}: a date window needs a contest_date (YYYY-MM-DD...), got "
                        f"{value!r}") from None
    start, end = window
    return (start is None or day >= start) and (end is None or day <= end)


def _spec(name: str) -> BenchmarkSpec:
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; accepted: {' | '.join(BENCHMARKS)}")
    return BENCHMARKS[name]
