"""LiveCodeBench's code-generation grader: a completion passes when the program in its last code
block passes every test of its problem.

`livecodebench_tests(row)` reads a problem's tests from a row of
`livecodebench/code_generation_lite`; `extract_code(completion)` takes the program out of a
completion; `grade_code(completion, problem)` runs it and returns a `CodeVerdict`.

The semantics are those of LiveCodeBench's `lcb_runner/evaluation/testing_util.py`: tests in
order, stopping at the first failure, each under its own time limit (6 s); the program sees
LiveCodeBench's import prelude (`from collections import *`, `from typing import *`, ..., a
recursion limit of 50000), so code that leans on it, like `List[int]` in a LeetCode signature,
runs as it does there; a stdin test compares stdout line by line, stripped, a line also matching
when its tokens are equal as decimals ("0.50" == "0.5"); a functional test calls
`Solution().<func_name>(*args)` (or a top-level function), one JSON argument per input line, and
compares the result, tuples made lists, with the JSON expected value. Where this departs:
1. A stdin program runs as a real `__main__` module; LiveCodeBench wraps it in a function, which
   turns its globals into locals and breaks `global x`.
2. Functional results: floats match within abs/rel 1e-6, nested tuples are made lists too, and
   each test gets a fresh `Solution()` (LiveCodeBench shares one instance).
3. `open(0)` and `os.read(0, n)` read the test's input (LiveCodeBench mocks every `open`), up
   to the sandbox's file size limit (`max_file_mb`); `sys.stdin` has no limit.

How it runs. All of a completion's tests run in ONE `sandbox.run_python` process (a process
costs ~56 ms), through the driver program `code_driver.py`, shipped as its source. The
candidate's code and the tests reach the driver as JSON on stdin,
never as code. The driver writes one JSON line per test to the original stdout and stops after
the first failure; tests left without a line when the process dies (`os._exit`, a crash, a
sandbox limit) fail with the sandbox's reason. Between tests it restores what a program may
change and the next would see (sys streams, `builtins`, the working directory); each stdin test
gets fresh globals. Expected stdout never enters the sandbox: the driver gets digests of it and
compares digests of what the program printed, so a program cannot read the answers out of the
driver's memory. Functional tests' expected values do go in: the tolerant comparison needs them.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import pickle
import signal
import zlib
from dataclasses import dataclass, replace
from typing import Optional, Tuple

from megatron_mgrpo.rewards import code_driver
from megatron_mgrpo.rewards.code_driver import clip, literal_digest, numeric_digest
from megatron_mgrpo.rewards.sandbox import SandboxLimits, run_python

__all__ = ["CodeTest", "CodeProblemTests", "CodeVerdict", "livecodebench_tests", "extract_code",
           "grade_code"]

_KINDS = ("stdin", "functional")
_PYTHON_TAGS = ("python", "py", "python3", "py3")
_SLACK_S = 5.0  # start-up, imports and comparisons on top of the per-test limits


@dataclass(frozen=True)
class CodeTest:
    """One test of a problem, in LiveCodeBench's format."""

    input: str
    """The stdin text; for a functional test, the JSON-encoded arguments, one per line."""
    output: str
    """The expected stdout; for a functional test, the JSON-encoded return value."""
    kind: str
    """`stdin` (a program reading stdin) or `functional` (a function called with arguments)."""


@dataclass(frozen=True)
class CodeProblemTests:
    """What grading a problem needs: its tests and how to call a functional solution."""

    tests: Tuple[CodeTest, ...]
    """Public tests, then private ones, in the order they are run."""
    func_name: Optional[str]
    """The method (of `Solution`) or function that functional tests call; None for stdin ones."""
    starter_code: str
    """The code the prompt gives to complete (a LeetCode class stub); "" when none."""


@dataclass(frozen=True)
class CodeVerdict:
    """How a completion did on a problem's tests."""

    passed: bool
    """Every test passed."""
    reason: str
    """"" when passed; else why: no code block, or the first failing test's reason (a wrong
    answer with the clipped expected and actual output, a time limit, a runtime error's last
    traceback line, the process ending mid-test, ...)."""
    cases_passed: int
    """Tests passed before the first failure (tests after it are not run)."""
    cases_total: int
    """Tests of the problem."""


# --------------------------------------------------------------------------- reading problems

def livecodebench_tests(row: dict) -> CodeProblemTests:
    """The tests of a `livecodebench/code_generation_lite` row: public then private.

    `public_test_cases` is JSON text (or the decoded list) of `{"input", "output", "testtype"}`
    entries; `private_test_cases` is the same, or as released: base64 of zlib of a pickled JSON
    string. The pickle is read with every global refused, so a crafted one cannot run code.
    Raises ValueError naming the field and question when a field is malformed.
    """
    qid = row.get("question_id", "<no question_id>")
    public = _test_cases(_json_field(row.get("public_test_cases", "[]"), "public_test_cases", qid),
                         "public_test_cases", qid)
    private = _test_cases(_private_field(row.get("private_test_cases", "[]"), qid),
                          "private_test_cases", qid)
    metadata = _json_field(row.get("metadata") or "{}", "metadata", qid)
    func_name = metadata.get("func_name") if isinstance(metadata, dict) else None
    if not isinstance(metadata, dict) or not isinstance(func_name, (str, type(None))):
        raise ValueError(f"question {qid}: metadata must be a JSON object with a string func_name")
    tests = tuple(public + private)
    if not tests:
        raise ValueError(f"question {qid}: no test cases")
    functional = any(t.kind == "functional" for t in tests)
    if functional and not func_name:
        raise ValueError(f"question {qid}: functional tests but no func_name in metadata")
    starter = row.get("starter_code") or ""
    if not isinstance(starter, str):
        raise ValueError(f"question {qid}: starter_code must be a string")
    return CodeProblemTests(tests, func_name if functional else None, starter)


def _json_field(value, field: str, qid):
    if not isinstance(value, str):
        return value  # already decoded
    try:
        return json.loads(value)
    except ValueError as e:
        raise ValueError(f"question {qid}: {field} is not valid JSON: {e}") from None


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Loads plain data only: a pickled str needs no globals, and refusing them all refuses
    every way a pickle can call code (`__reduce__` needs a global to call)."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}")


def _private_field(value, qid):
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        pass  # the released encoding, below
    try:
        packed = zlib.decompress(base64.b64decode(value.encode("ascii")))
        text = _NoGlobalsUnpickler(io.BytesIO(packed)).load()
    except Exception as e:  # any malformed input: unpickling garbage raises many kinds
        raise ValueError(f"question {qid}: private_test_cases is neither JSON nor "
                         f"base64(zlib(pickle(JSON))): {type(e).__name__}: {e}") from None
    if not isinstance(text, str):
        raise ValueError(f"question {qid}: private_test_cases unpickles to a "
                         f"{type(text).__name__}, not a JSON string")
    return _json_field(text, "private_test_cases", qid)


def _test_cases(value, field: str, qid) -> list:
    if not isinstance(value, list):
        raise ValueError(f"question {qid}: {field} must be a list of test cases")
    tests = []
    for i, case in enumerate(value):
        if not (isinstance(case, dict) and isinstance(case.get("input"), str)
                and isinstance(case.get("output"), str) and case.get("testtype") in _KINDS):
            raise ValueError(f"question {qid}: {field}[{i}] needs string input and output and a "
                             f"testtype of {' | '.join(_KINDS)}")
        tests.append(CodeTest(case["input"], case["output"], case["testtype"]))
    return tests


def extract_code(completion: str) -> Optional[str]:
    """The content of the last fenced code block tagged python (`python`, `py`, `python3`,
    `py3`), else of the last block of any tag or none; None when there is no closed block.

    A completion that ends inside an unclosed block (cut off by the length limit) gives None:
    its answer is unfinished, and an earlier block is a draft it went on from. LiveCodeBench's
    extractor fails such completions too (it takes the text between the last two fence lines).
    """
    blocks, tag, body = [], None, []
    for line in completion.replace("\r\n", "\n").split("\n"):
        stripped = line.strip()
        if tag is None:
            if stripped.startswith("```"):
                tag, body = (stripped[3:].split() or [""])[0].lower(), []
        elif len(stripped) >= 3 and set(stripped) == {"`"}:
            blocks.append((tag, "\n".join(body)))
            tag = None
        else:
            body.append(line)
    if tag is not None:
        return None
    python = [code for block_tag, code in blocks if block_tag in _PYTHON_TAGS]
    candidates = python or [code for _, code in blocks]
    return candidates[-1] if candidates else None


# --------------------------------------------------------------------------- grading

def grade_code(completion: str, problem: CodeProblemTests, timeout_per_test_s: float = 6.0,
               limits: Optional[SandboxLimits] = None) -> CodeVerdict:
    """Run the completion's code on the problem's tests, the LiveCodeBench way (module
    docstring), in one sandbox process. `limits` (default `SandboxLimits()`) bounds that process;
    its wall and CPU time become `timeout_per_test_s` per test plus a few seconds, and its
    `max_output_bytes` caps each test's stdout ("output too long"). Raises RuntimeError only
    when the sandbox itself cannot be set up."""
    total = len(problem.tests)
    code = extract_code(completion)
    if code is None:
        why = ("the last code block is not closed (a cut-off completion)"
               if "```" in completion else "no code block in the completion")
        return CodeVerdict(False, why, 0, total)
    if total == 0:
        return CodeVerdict(False, "the problem has no tests", 0, 0)
    limits = limits or SandboxLimits()
    budget = timeout_per_test_s * total + _SLACK_S
    job = {"code": code, "func_name": problem.func_name, "timeout_s": timeout_per_test_s,
           "max_output_bytes": limits.max_output_bytes,
           "tests": _driver_tests(problem)}
    run = run_python(_driver_source(), json.dumps(job),
                     limits=replace(limits, wall_time_s=budget, cpu_time_s=budget))
    results = _results(run.stdout)
    for i, test in enumerate(problem.tests):
        where = f"test {i + 1} of {total}"
        if i >= len(results):  # the process died during test i
            return CodeVerdict(False, f"{where}: {_ended(run, timeout_per_test_s)}", i, total)
        if "got" in results[i]:
            return CodeVerdict(False, f"{where}: wrong answer: expected {clip(test.output)!r}, "
                                      f"got {results[i]['got']!r}", i, total)
        if not results[i]["ok"]:
            return CodeVerdict(False, f"{where}: {results[i]['reason']}", i, total)
    return CodeVerdict(True, "", total, total)


def _ended(run, timeout_s: float) -> str:
    if run.returncode == -signal.SIGPROF:  # the backstop of the driver's `_Alarm`
        return f"time limit of {timeout_s:g} s exceeded"
    why = run.reason or f"the program ended the process (exit code {run.returncode})"
    return f"process ended mid-test: {why}"


@functools.lru_cache(maxsize=1024)
def _driver_tests(problem: CodeProblemTests) -> list:
    """The tests as the driver takes them: stdin outputs as digests. Cached because every
    completion of a problem is graded against them and digesting large outputs takes time."""
    return [{"kind": t.kind, "input": t.input, "output": t.output} if t.kind == "functional" else
            {"kind": t.kind, "input": t.input, "literal": literal_digest(t.output),
             "numeric": numeric_digest(t.output)} for t in problem.tests]


def _results(stdout: str) -> list:
    """The driver's result lines, in test order; anything else on stdout is ignored."""
    results = []
    for line in stdout.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if (isinstance(entry, dict) and entry.get("test") == len(results)
                and isinstance(entry.get("ok"), bool)):
            results.append(entry)
    return results


@functools.lru_cache(maxsize=None)
def _driver_source() -> str:
    with open(code_driver.__file__, encoding="utf-8") as f:
        return f.read()
