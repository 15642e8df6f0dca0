"""The program that runs a completion's LiveCodeBench tests inside the sandbox.

`rewards.code.grade_code` sends this file's source to `sandbox.run_python` as the program, and
the job (the candidate's code, the tests, the limits) as JSON on its stdin; it writes one JSON
result line per test to its original stdout and stops after the first failure. It runs in a
bare interpreter (`python -I`), so it imports nothing but the standard library; the parent
imports its digest functions to digest expected outputs the same way.
"""

import builtins
import decimal
import hashlib
import io
import json
import math
import os
import signal
import sys
import tempfile
import traceback
import types

_PRELUDE_MODULES = ("string", "re", "datetime", "collections", "heapq", "bisect", "copy", "math",
                    "random", "statistics", "itertools", "functools", "operator", "io", "sys",
                    "json")
# LiveCodeBench's `import_string`, run before every program.
_LCB_PRELUDE = ("".join(f"from {m} import *\n" for m in _PRELUDE_MODULES)
                + "from builtins import *\nfrom typing import *\n"
                + f"import {', '.join(_PRELUDE_MODULES)}\nsys.setrecursionlimit(50000)\n")


def clip(text: str, n: int = 200) -> str:
    return text if len(text) <= n else text[:n] + "..."


class _OutputTooLong(BaseException):
    """Raised in the program when its test's stdout passes the cap."""


class _CappedBytes(io.BytesIO):
    """The bytes under a test's captured stdout: at most `cap` of them; `close()` is ignored
    so that the output can be read after the program closes sys.stdout."""

    def __init__(self, cap: int):
        super().__init__()
        self.cap = cap

    def write(self, data):
        if self.tell() + len(data) > self.cap:
            raise _OutputTooLong()
        return super().write(data)

    def close(self):
        pass


class _Stdin(io.BytesIO):
    """A test's input bytes; `fileno()` is 0, which holds a copy (see `_fd0`)."""

    def fileno(self):
        return 0


class _Alarm:
    """A test's time limit. When its wall time is up, SIGALRM reports the test timed out and
    ends the process: the first failure ends grading anyway, and unlike an exception this
    cannot be swallowed by the program. Python runs that handler between bytecodes only; a
    program stuck in one C call (`sum(range(10**12))`), or one that ignores SIGALRM, is ended
    by the kernel instead, one CPU second later, by SIGPROF's default action."""

    def __init__(self, report):
        self.report, self.seconds = report, 0.0

    def _ring(self, signum, frame):
        self.report({"ok": False, "reason": f"time limit of {self.seconds:g} s exceeded"})
        os._exit(0)

    def call(self, seconds: float, fn, *args):
        self.seconds = seconds
        signal.signal(signal.SIGALRM, self._ring)  # each time: the program may have replaced it
        signal.signal(signal.SIGPROF, signal.SIG_DFL)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        signal.setitimer(signal.ITIMER_PROF, seconds + 1.0)
        try:
            return fn(*args)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.setitimer(signal.ITIMER_PROF, 0)


def literal_digest(text: str) -> str:
    """Digest of LiveCodeBench's comparison form of an output: the whole stripped, split at
    "\\n", each line stripped."""
    lines = [line.strip() for line in text.strip().split("\n")]
    return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogatepass")).hexdigest()


def numeric_digest(text: str) -> str:
    """As `literal_digest`, with each line whose tokens are all finite decimals written
    in one form per value: LiveCodeBench's Decimal comparison of lines ("1.50 2" == "1.5 2")."""
    lines = []
    for line in text.strip().split("\n"):
        try:
            lines.append(" ".join(_number(token) for token in line.split()))
        except (decimal.InvalidOperation, ValueError):
            lines.append(line.strip())
    return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogatepass")).hexdigest()


def _number(token: str) -> str:
    """One spelling per decimal value, exactly (no rounding, unlike `Decimal.normalize`)."""
    sign, digits, exponent = decimal.Decimal(token).as_tuple()
    if not isinstance(exponent, int):
        raise ValueError("NaN or infinity: compared as text")
    digits = "".join(map(str, digits)).lstrip("0")
    if not digits:
        return "0"
    kept = digits.rstrip("0")
    return f"{'-' if sign else ''}{kept}e{exponent + len(digits) - len(kept)}"


def _lists(value):
    """Tuples made lists, also nested: expected values come from JSON, which has no tuples."""
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return value


def _same_value(got, want) -> bool:
    """`got == want`, but floats (on either side) match within abs/rel 1e-6."""
    if isinstance(got, float) or isinstance(want, float):
        numbers = all(isinstance(v, (int, float)) for v in (got, want))
        return numbers and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6)
    if isinstance(got, list) and isinstance(want, list):
        return len(got) == len(want) and all(map(_same_value, got, want))
    if isinstance(got, dict) and isinstance(want, dict):
        return got.keys() == want.keys() and all(_same_value(got[k], want[k]) for k in got)
    return bool(got == want)


def _failure(e: BaseException, job: dict) -> str:
    if isinstance(e, _OutputTooLong):
        return f"output too long (over {job['max_output_bytes']} bytes)"
    if isinstance(e, MemoryError):
        return "memory limit exceeded"
    if isinstance(e, SystemExit):
        return f"runtime error: sys.exit({e.code!r})"
    return "runtime error: " + traceback.format_exception_only(type(e), e)[-1].strip()


def _fd0(data: bytes) -> None:
    """A copy of the input on fd 0, for `open(0)` and `os.read(0, n)`; /dev/null where the
    file size limit refuses it (SIGXFSZ is ignored, so the write fails instead of killing)."""
    try:
        with tempfile.TemporaryFile() as f:
            f.write(data)
            f.flush()
            f.seek(0)
            os.dup2(f.fileno(), 0)
    except OSError:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)


def _exec(compiled, namespace: dict, stdout=None) -> None:
    """Run the program in `namespace` after the prelude; a sys.exit(0) or exit() is a normal
    end. Flushes `stdout` inside the time limit: the cap may trip there."""
    exec(compile(_LCB_PRELUDE, "<prelude>", "exec", dont_inherit=True), namespace)
    try:
        exec(compiled, namespace)
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
    if stdout is not None:
        stdout.flush()


def _stdin_test(compiled, test: dict, job: dict, alarm: _Alarm) -> dict:
    data = test["input"].encode("utf-8", "surrogatepass")
    _fd0(data)
    captured = _CappedBytes(job["max_output_bytes"])
    sys.stdin = io.TextIOWrapper(_Stdin(data), encoding="utf-8")
    sys.stdout = stdout = io.TextIOWrapper(captured, encoding="utf-8")
    main = sys.modules["__main__"] = types.ModuleType("__main__")  # fresh globals per test
    try:
        alarm.call(job["timeout_s"], _exec, compiled, main.__dict__, stdout)
    except BaseException as e:
        return {"ok": False, "reason": _failure(e, job)}
    finally:
        main.__dict__.clear()  # breaks the cycles through function globals: frees at once
    printed = captured.getvalue().decode("utf-8", "replace")
    if (literal_digest(printed) == test["literal"]
            or numeric_digest(printed) == test["numeric"]):
        return {"ok": True}
    return {"ok": False, "got": clip(printed)}


def _call(namespace: dict, func_name: str, args: list):
    solution = namespace.get("Solution")
    if isinstance(solution, type):
        return _lists(getattr(solution(), func_name)(*args))  # a fresh instance per test
    if not callable(namespace.get(func_name)):
        raise NameError(f"neither a class Solution nor a function {func_name!r}")
    return _lists(namespace[func_name](*args))


def _functional_test(compiled, namespace: dict, test: dict, job: dict,
                            alarm: _Alarm) -> dict:
    sys.stdin = io.TextIOWrapper(_Stdin(b""), encoding="utf-8")
    sys.stdout = open(os.devnull, "w")  # debug prints are not answers
    try:
        if not namespace:  # the first functional test loads the code, under its time limit
            namespace["__name__"] = "solution"
            alarm.call(job["timeout_s"], _exec, compiled, namespace)
        args = [json.loads(line) for line in test["input"].strip().split("\n")]
        want = json.loads(test["output"])
        got = alarm.call(job["timeout_s"], _call, namespace, job["func_name"], args)
        if alarm.call(job["timeout_s"], _same_value, got, want):  # may run got.__eq__
            return {"ok": True}
        return {"ok": False, "got": clip(repr(got))}
    except BaseException as e:
        return {"ok": False, "reason": _failure(e, job)}


def _restore(saved: dict) -> None:
    """Undo what a test may have changed that the next one would see."""
    sys.stdin, sys.stdout, sys.stderr = saved["streams"]
    sys.modules["__main__"] = saved["main"]
    for name in set(builtins.__dict__) - set(saved["builtins"]):
        del builtins.__dict__[name]
    builtins.__dict__.update(saved["builtins"])  # e.g. `builtins.input = sys.stdin.readline`
    try:
        os.chdir(saved["cwd"])
    except OSError:
        pass


def main() -> None:
    job = json.loads(sys.stdin.buffer.read())
    results = os.fdopen(os.dup(1), "w", encoding="utf-8")
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)  # stray writes to fd 1 are not answers (LiveCodeBench ignores them too)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    saved = {"streams": (sys.stdin, sys.stdout, sys.stderr), "main": sys.modules["__main__"],
             "builtins": dict(builtins.__dict__), "cwd": os.getcwd()}
    index, pid, namespace = 0, os.getpid(), {}

    def report(result):
        results.write(json.dumps(dict(result, test=index)) + "\n")
        results.flush()

    alarm = _Alarm(report)
    try:
        # dont_inherit: not the `from __future__` imports of the sandbox's bootstrap.
        compiled = compile(job["code"], "solution.py", "exec", dont_inherit=True)
    except Exception as e:  # SyntaxError, or ValueError for a NUL byte
        compiled = "compile error: " + traceback.format_exception_only(type(e), e)[-1].strip()
    for index, test in enumerate(job["tests"]):
        sys.stderr = open(os.devnull, "w")  # stderr could fill the sandbox's cap
        if isinstance(compiled, str):
            result = {"ok": False, "reason": compiled}
        elif test["kind"] == "stdin":
            result = _stdin_test(compiled, test, job, alarm)
        else:
            result = _functional_test(compiled, namespace, test, job, alarm)
        if os.getpid() != pid:
            os._exit(0)  # a child the program forked came back here: only the driver reports
        _restore(saved)
        report(result)
        if not result["ok"]:
            break
    os._exit(0)  # without waiting for threads the program left running


if __name__ == "__main__":
    main()
