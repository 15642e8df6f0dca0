"""The LiveCodeBench code grader: reading the released rows, extracting code, and grading real
programs in the real sandbox (one process per completion)."""

import base64
import json
import os
import pickle
import zlib

import pytest

from megatron_mgrpo.rewards.code import (
    CodeProblemTests,
    CodeTest,
    extract_code,
    grade_code,
    livecodebench_tests,
)
from megatron_mgrpo.rewards.sandbox import SandboxLimits


def _release_encoding(cases) -> str:
    """How LiveCodeBench's released files store private_test_cases."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()


def _row(**fields):
    row = {"question_title": "A + B", "question_content": "Print a + b.", "platform": "atcoder",
           "question_id": "abc000_a", "contest_id": "abc000", "contest_date": "2024-01-01T00:00:00",
           "starter_code": "", "difficulty": "easy", "metadata": "{}",
           "public_test_cases": json.dumps([{"input": "1 2\n", "output": "3\n",
                                             "testtype": "stdin"}]),
           "private_test_cases": _release_encoding([{"input": "5 7\n", "output": "12\n",
                                                     "testtype": "stdin"}])}
    row.update(fields)
    return row


def _stdin(*pairs):
    return CodeProblemTests(tuple(CodeTest(i, o, "stdin") for i, o in pairs), None, "")


def _functional(func_name, *pairs):
    return CodeProblemTests(tuple(CodeTest(i, o, "functional") for i, o in pairs), func_name,
                            "")


def _grade(code, problem, **kwargs):
    return grade_code(f"Here it is:\n```python\n{code}\n```\n", problem, **kwargs)


ADD = _stdin(("1 2\n", "3\n"), ("5 7\n", "12\n"), ("-4 4\n", "0\n"))


# --- livecodebench_tests ----------------------------------------------------------------------

def test_reads_a_released_row_public_then_private():
    problem = livecodebench_tests(_row())
    assert problem.tests == (CodeTest("1 2\n", "3\n", "stdin"), CodeTest("5 7\n", "12\n", "stdin"))
    assert problem.func_name is None and problem.starter_code == ""


def test_reads_plain_json_private_tests_and_func_name():
    cases = [{"input": "[2,7,11,15]\n9", "output": "[0, 1]", "testtype": "functional"}]
    starter = "class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
    problem = livecodebench_tests(_row(
        platform="leetcode", starter_code=starter, metadata='{"func_name": "twoSum"}',
        public_test_cases=json.dumps(cases), private_test_cases=json.dumps(cases * 2)))
    assert len(problem.tests) == 3 and problem.tests[0].kind == "functional"
    assert problem.func_name == "twoSum" and problem.starter_code == starter


def test_accepts_already_decoded_fields():
    cases = [{"input": "1\n", "output": "1\n", "testtype": "stdin"}]
    problem = livecodebench_tests(_row(public_test_cases=cases, private_test_cases=[],
                                       metadata={}))
    assert problem.tests == (CodeTest("1\n", "1\n", "stdin"),)


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_a_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = base64.b64encode(zlib.compress(pickle.dumps(_Evil(marker)))).decode()
    with pytest.raises(ValueError, match="abc000_a.*private_test_cases.*refusing.*system"):
        livecodebench_tests(_row(private_test_cases=evil))
    assert not marker.exists()


def test_a_pickle_of_something_else_than_a_string_is_refused():
    odd = base64.b64encode(zlib.compress(pickle.dumps([1, 2]))).decode()
    with pytest.raises(ValueError, match="private_test_cases unpickles to a list"):
        livecodebench_tests(_row(private_test_cases=odd))


@pytest.mark.parametrize("fields, field", [
    ({"public_test_cases": "[{not json"}, "public_test_cases"),
    ({"private_test_cases": "not base64 either!"}, "private_test_cases"),
    ({"metadata": "{func_name"}, "metadata"),
    ({"public_test_cases": '[{"input": "1", "output": "1", "testtype": "exotic"}]'},
     r"public_test_cases\[0\]"),
    ({"public_test_cases": '{"input": "1"}'}, "public_test_cases"),
])
def test_malformed_fields_name_the_field_and_question(fields, field):
    with pytest.raises(ValueError, match=f"abc000_a.*{field}"):
        livecodebench_tests(_row(**fields))


def test_functional_tests_need_a_func_name():
    cases = json.dumps([{"input": "1", "output": "1", "testtype": "functional"}])
    with pytest.raises(ValueError, match="abc000_a.*func_name"):
        livecodebench_tests(_row(public_test_cases=cases, private_test_cases="[]"))


# --- extract_code ------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, code", [
    ("```python\nprint(1)\n```\ntext\n```python\nprint(2)\n```", "print(2)"),   # the last one
    ("```python\nprint(1)\n```\n```text\n3\n```", "print(1)"),     # python-tagged blocks win
    ("```py\nx = 1\n```", "x = 1"),
    ("```Python3\nx = 1\n```", "x = 1"),
    ("```\nprint(3)\n```", "print(3)"),                            # no tag
    ("```cpp\nint main() {}\n```", "int main() {}"),              # nothing python: the last
    ("no code at all", None),
    ("```python\nprint(1)\n```\nbetter:\n```python\nprint(2", None),  # cut off: unfinished
    ("```python\nprint(1", None),                                  # no closed block
    ("```python\r\nprint(1)\r\n```\r\n", "print(1)"),
    ("  ```python\n  if x:\n      y()\n  ```", "  if x:\n      y()"),
])
def test_extract_code(completion, code):
    assert extract_code(completion) == code


# --- grade_code: stdin programs -----------------------------------------------------------------

def test_a_correct_program_passes_every_case():
    verdict = _grade("a, b = map(int, input().split())\nprint(a + b)", ADD)
    assert (verdict.passed, verdict.reason, verdict.cases_passed, verdict.cases_total) == (
        True, "", 3, 3)


def test_a_wrong_answer_stops_at_the_first_failure():
    verdict = _grade("a, b = map(int, input().split())\nprint(abs(a) + b)", ADD)
    assert not verdict.passed and verdict.cases_passed == 2 and verdict.cases_total == 3
    assert "test 3 of 3: wrong answer" in verdict.reason
    assert "'0\\n'" in verdict.reason and "'8\\n'" in verdict.reason


@pytest.mark.parametrize("code", [
    "import sys\nprint(sum(map(int, sys.stdin.buffer.read().split())))",
    "print(sum(map(int, open(0).read().split())))",
    "import os\nprint(sum(map(int, os.read(0, 1 << 16).split())))",
    "import os, sys\nprint(sum(map(int, os.read(sys.stdin.fileno(), 99).split())))",
    "import sys\nsys.stdout.buffer.write(b'%d' % sum(map(int, sys.stdin.readline().split())))",
    "import sys\nprint(sum(map(int, input().split())))\nsys.exit(0)\nprint('unreachable')",
    "import builtins, sys\nbuiltins.input = sys.stdin.readline\n"
    "print(sum(map(int, input().split())))",
    "def main():\n    print(sum(map(int, input().split())))\n"
    "if __name__ == '__main__':\n    main()",
    "print(sum(map(int, input().split())))\nexit()",
])
def test_the_usual_ways_of_reading_and_ending(code):
    assert _grade(code, ADD).passed


def test_lcb_prelude_and_decimal_comparison():
    problem = _stdin(("3\n", "0.5\n1 2\n"))
    # `Counter` and `sqrt` without importing them, as LiveCodeBench's import prelude allows;
    # "0.50000" and "1.0   2e0" equal "0.5" and "1 2" as decimals.
    code = "n = int(input())\nprint('%.5f' % (sqrt(Counter([n])[n] / 4)))\nprint('1.0   2e0')"
    assert _grade(code, problem).passed
    assert not _grade("print('0.5')\nprint('1 2.000001')", problem).passed


def test_an_infinite_loop_times_out_quickly():
    verdict = _grade("n = int(input().split()[0])\nwhile n == 5:\n    pass\nprint(n + 2)", ADD,
                     timeout_per_test_s=1.0)
    assert not verdict.passed and verdict.cases_passed == 1
    assert "time limit of 1 s exceeded" in verdict.reason


@pytest.mark.parametrize("code", [
    # A bare `except:` around the loop: the time limit is no exception to swallow.
    "while True:\n    try:\n        while True:\n            pass\n    except:\n        pass",
    # SIGALRM ignored: the per-test CPU timer ends it.
    "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass",
])
def test_a_program_cannot_escape_the_time_limit(code):
    verdict = _grade(code, ADD, timeout_per_test_s=0.5)
    assert verdict.reason == "test 1 of 3: time limit of 0.5 s exceeded"


def test_a_program_stuck_in_one_c_call_is_ended_too():
    # sum() over a range runs in C without checking for signals: no Python handler can run.
    code = "n = int(input().split()[0])\nprint(sum(range(n * 10 ** 10)))"
    verdict = _grade(code, ADD, timeout_per_test_s=0.5)
    # Not the sandbox's wall limit ("process ended mid-test: wall time limit of 6.5 s ..."):
    # the per-test CPU timer ended it.
    assert verdict.reason == "test 1 of 3: time limit of 0.5 s exceeded"


def test_os_exit_fails_the_test_not_the_grader():
    verdict = _grade("import os\nos._exit(3)", ADD)
    assert not verdict.passed and verdict.cases_passed == 0
    assert "process ended mid-test: exited with code 3" in verdict.reason


def test_os_exit_on_a_later_test_keeps_the_earlier_results():
    code = "import os\na, b = map(int, input().split())\nif a == 5:\n    os._exit(0)\nprint(a + b)"
    verdict = _grade(code, ADD)
    assert not verdict.passed and verdict.cases_passed == 1
    assert "test 2 of 3: process ended mid-test" in verdict.reason


def test_an_exception_reports_its_last_line():
    verdict = _grade("a, b = map(int, input().split())\nprint({}[a])", ADD)
    assert verdict.reason == "test 1 of 3: runtime error: KeyError: 1"
    verdict = _grade("import sys\nsys.exit(2)", ADD)
    assert verdict.reason == "test 1 of 3: runtime error: sys.exit(2)"


def test_a_syntax_error_fails_every_case():
    verdict = _grade("print(1", ADD)
    assert not verdict.passed and verdict.cases_passed == 0
    assert verdict.reason.startswith("test 1 of 3: compile error: SyntaxError")


def test_module_state_does_not_leak_between_tests():
    problem = _stdin(("\n", "1\n"), ("\n", "1\n"), ("\n", "1\n"))
    code = "try:\n    seen\nexcept NameError:\n    seen = []\nseen.append(1)\nprint(len(seen))"
    assert _grade(code, problem).passed
    # Nor do changes to builtins: a leaked `builtins.runs` would count 2 and 3.
    code = "import builtins\nbuiltins.runs = getattr(builtins, 'runs', 0) + 1\nprint(runs)"
    assert _grade(code, problem).passed


def test_the_tests_share_one_process():
    # The work directory lives as long as the process: a counter file there counts the tests.
    problem = _stdin(("\n", "1\n"), ("\n", "2\n"), ("\n", "3\n"))
    code = ("import os\nn = int(open('count').read()) + 1 if os.path.exists('count') else 1\n"
            "open('count', 'w').write(str(n))\nprint(n)")
    assert _grade(code, problem).passed


def test_too_much_output_fails():
    verdict = _grade("print('x' * 5000)", ADD, limits=SandboxLimits(max_output_bytes=1000))
    assert not verdict.passed and "output too long" in verdict.reason


def test_expected_output_cannot_be_read_from_the_driver():
    # A program hunting the answer in the grader's memory: stdin answers never enter the sandbox.
    code = ("import gc, sys\nfound = set()\n"
            "def look(v):\n    if isinstance(v, str) and v.startswith('SEC' 'RET-'):\n"
            "        found.add(v.strip())\n"
            "for o in gc.get_objects():\n"
            "    for v in (o.values() if isinstance(o, dict) else o if isinstance(o, (list, tuple))"
            " else ()):\n        look(v)\n"
            "f = sys._getframe()\nwhile f:\n    [look(v) for v in f.f_locals.values()]\n"
            "    f = f.f_back\nprint(' '.join(sorted(found)))")
    verdict = _grade(code, _stdin(("1\n", "SECRET-4242\n")))
    assert not verdict.passed and "wrong answer" in verdict.reason


def test_no_code_block():
    verdict = grade_code("I think the answer is to add them.", ADD)
    assert verdict == type(verdict)(False, "no code block in the completion", 0, 3)
    cut = grade_code("```python\nprint(int(input()) + 1)\n```\nFaster:\n```python\nimport", ADD)
    assert not cut.passed and cut.reason.startswith("the last code block is not closed")


# --- grade_code: functional (LeetCode) problems -------------------------------------------------

TWO_SUM = _functional("twoSum", ("[2,7,11,15]\n9", "[0, 1]"), ("[3,2,4]\n6", "[1, 2]"),
                      ("[3,3]\n6", "[0, 1]"))


def test_a_solution_class_with_prelude_types_passes():
    code = ("class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
            "        seen = {}\n        for i, x in enumerate(nums):\n"
            "            if target - x in seen:\n                return (seen[target - x], i)\n"
            "            seen[x] = i\n")
    verdict = _grade(code, TWO_SUM)
    assert verdict.passed and verdict.cases_passed == 3


def test_a_plain_function_passes():
    code = ("def twoSum(nums, target):\n    print('debug output is ignored')\n"
            "    return [[i, j] for i in range(len(nums)) for j in range(i + 1, len(nums))"
            " if nums[i] + nums[j] == target][0]")
    assert _grade(code, TWO_SUM).passed


def test_a_wrong_result_fails_with_both_values():
    code = "class Solution:\n    def twoSum(self, nums, target):\n        return [0, 1]"
    verdict = _grade(code, TWO_SUM)
    assert not verdict.passed and verdict.cases_passed == 1
    assert verdict.reason == "test 2 of 3: wrong answer: expected '[1, 2]', got '[0, 1]'"


def test_floats_match_within_tolerance_only():
    problem = _functional("mean", ("0.1\n0.2", "0.15"), ("1\n2", "1.5"))
    assert _grade("def mean(a, b):\n    return (a + b) / 2 + 1e-9", problem).passed
    assert not _grade("def mean(a, b):\n    return (a + b) / 2 + 1e-3", problem).passed


def test_each_test_gets_a_fresh_solution():
    problem = _functional("count", ("0", "1"), ("0", "1"))
    code = ("class Solution:\n    calls = 0\n    def __init__(self):\n        self.calls = 0\n"
            "    def count(self, x):\n        self.calls += 1\n        return self.calls")
    assert _grade(code, problem).passed


def test_a_missing_method_and_a_crash_are_runtime_errors():
    verdict = _grade("class Solution:\n    pass", TWO_SUM)
    assert "runtime error: AttributeError" in verdict.reason and "twoSum" in verdict.reason
    verdict = _grade("def twoSum(nums, target):\n    return nums[10]", TWO_SUM)
    assert verdict.reason == "test 1 of 3: runtime error: IndexError: list index out of range"
