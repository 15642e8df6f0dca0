"""Answer extraction and equivalence: math (boxed + math_verify), final number, multiple choice."""

import re
import sys
import threading
import time

import pytest

from megatron_mgrpo.rewards import GRADERS, get_grader
from megatron_mgrpo.rewards.math_answers import (
    clear_caches,
    extract_boxed,
    math_equivalent,
    normalize_answer,
)
from megatron_mgrpo.rewards.final_number import extract_final_number
from megatron_mgrpo.rewards.multiple_choice import choice_equivalent, extract_choice


# --- extract_boxed ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    (r"so the answer is \boxed{5}.", "5"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"first \boxed{1}, then corrected: \boxed{2}", "2"),                    # the last one
    (r"$\boxed{\{1, \frac{1}{2}\}}$", r"\{1, \frac{1}{2}\}"),                 # escaped braces
    (r"\boxed{a^{2}+{b}}", "a^{2}+{b}"),                                       # nesting
    (r"$\boxed 5$", "5"),                                                      # unbraced form
    (r"\boxed 42 apples", "42"),
    (r"\fbox{7}", "7"),
    (r"\boxed {  3 }", "3"),                                                   # space, padding
    (r"\boxed{1} then \boxed{2", None),     # last one truncated: no answer, not the earlier box
    (r"\boxed{}", None),
    (r"\boxed{   }", None),
    (r"no box here: 5", None),
    (r"\boxedx{3}", None),                  # a different command
    (r"ends with \boxed", None),
    ("", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_non_string_is_none():
    assert extract_boxed(None) is None
    assert extract_boxed(5) is None


# --- math_equivalent -------------------------------------------------------------------------

@pytest.mark.parametrize("a, b", [
    (r"\frac{1}{2}", "0.5"),
    ("1/2", "0.5"),
    (r"\frac{1}{2}", "1/2"),
    (r"\dfrac12", "1/2"),
    ("-0.5", r"-\frac{1}{2}"),
    ("1,000", "1000"),
    ("1{,}000", "1000"),
    ("$5$", "5"),
    ("5.", "5"),
    ("3.0", "3"),
    (r"\left(1,2\right)", "(1, 2)"),
    (r"2\!\sqrt{2}", r"\sqrt{8}"),           # needs SymPy: not plain numbers
    ("x^2+1", "1+x^2"),
    ("10^{3}", "1000"),
    ("x=2", "2"),
    (r"\text{yes}", "yes"),
    ("east", "east"),
    ("(1,2)", "1<x<2"),              # math_verify's verify accepts this one direction only
    (r"1\le x\le 2", "[1,2]"),
])
def test_math_equivalent_true(a, b):
    assert math_equivalent(a, b) is True
    assert math_equivalent(b, a) is True                 # symmetric


@pytest.mark.parametrize("a, b", [
    ("1", "2"),
    ("0.5", "0.25"),
    ("(1,234)", "1234"),          # a pair, not a number with a thousands separator
    ("east", "seat"),             # SymPy alone would call these equal products of symbols
    (r"\frac{1}{2}", r"\frac{1}{3}"),
    (None, "1"),
    ("1", None),
    ("", ""),
    ("  ", "0"),
])
def test_math_equivalent_false(a, b):
    assert math_equivalent(a, b) is False
    assert math_equivalent(b, a) is False


@pytest.mark.parametrize("odd", [
    r"\frac{", "{{{{", "\\", "}{", "1/0", "0/0", r"\frac{1}{0}", "1e999999999",
    "9" * 5000, "a" * 5000, "\x00", r"\sqrt{-1}^{\infty}", "$$$", r"\begin{matrix}",
])
def test_math_equivalent_never_raises(odd):
    assert math_equivalent(odd, "1") in (True, False)
    assert math_equivalent("1", odd) in (True, False)
    assert math_equivalent(odd, odd) in (True, False)


def test_math_equivalent_non_string_is_false():
    assert math_equivalent(5, "5") is False


def test_normalize_answer():
    assert normalize_answer(r" $\left( 1 ,\, 2 \right)$. ") == "(1,2)"
    assert normalize_answer("12,345.5") == "12345.5"
    assert normalize_answer(r"\tfrac{3}{4}") == r"\frac{3}{4}"


def test_math_equivalent_in_worker_thread():
    # math_verify's default signal-based timeout raises ValueError outside the main thread;
    # clear the caches so the thread really parses.
    clear_caches()
    results = []
    thread = threading.Thread(
        target=lambda: results.append(
            (math_equivalent(r"3\sqrt{2}", r"\sqrt{18}"), math_equivalent(r"3\sqrt{2}", "4"))))
    thread.start()
    thread.join()
    assert results == [(True, False)]


@pytest.mark.parametrize("costly", [r"10^{10^{10}}", r"9^{9^{9^{9}}}", r"10^{10000000}",
                                    r"(10^{100})!", "1" * 300])
def test_costly_answers_never_reach_sympy(costly):
    # In a worker thread there is no timeout: without the guard sympy works on these for many
    # minutes; with it they are refused at once. A minute tells the two apart on any machine.
    results = []
    thread = threading.Thread(target=lambda: results.append(math_equivalent(costly, "1")),
                              daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert results == [False]
    assert math_equivalent(costly, costly)                     # still equal to itself


def test_single_powers_still_use_sympy():
    assert math_equivalent("2^{10}", "1024")
    assert math_equivalent("5!", "120")


def test_math_equivalent_without_math_verify(monkeypatch):
    # The plain tiers must still grade numbers when math_verify is missing (None in sys.modules
    # makes `import math_verify` raise ImportError).
    monkeypatch.setitem(sys.modules, "math_verify", None)
    clear_caches()
    try:
        assert math_equivalent("1/2", "0.5")
        assert math_equivalent(r"\frac{1}{2}", "0.50")
        assert not math_equivalent(r"2\sqrt{2}", r"\sqrt{8}")   # needs SymPy
    finally:
        clear_caches()


def test_math_equivalent_is_fast_when_cached():
    answers = [r"\frac{1}{2}", "0.5", "3", r"2\sqrt{2}", r"\sqrt{8}", "x+1", "7", "1/3", "0.25",
               r"\pi"]
    for a in answers:               # warm the caches
        for b in answers:
            math_equivalent(a, b)
    start = time.perf_counter()
    for _ in range(50):
        for a in answers:
            for b in answers:
                math_equivalent(a, b)
    assert time.perf_counter() - start < 2.0      # 5,000 calls


# --- multiple choice -------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("The answer is (C)", "C"),
    ("Answer: C", "C"),
    ("**Answer:** B", "B"),
    ("so the correct answer is option D.", "D"),
    (r"Therefore \boxed{C}", "C"),
    (r"\boxed{(b)}", "B"),
    (r"\boxed{\text{A}}", "A"),
    (r"\boxed{D. 42}", "D"),
    ("The answer is A. Wait, no: the answer is B", "B"),          # the last phrase
    (r"The answer is A ... \boxed{B}", "B"),                       # a box wins over a phrase
    ("the answer is a prime number", None),                        # an article, not option A
    ("The answer is E", None),                                     # not one of ABCD
    ("I think it's B", None),
    ("C", "C"),
    ("(D).", "D"),
    ("", None),
])
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


def test_extract_choice_other_choices():
    assert extract_choice("The answer is E", choices="ABCDE") == "E"
    assert extract_choice(r"\boxed{J}", choices="ABCDEFGHIJ") == "J"


def test_choice_equivalent():
    assert choice_equivalent("C", "(c)")
    assert choice_equivalent(r"\text{B}", "B")
    assert not choice_equivalent("C", "D")
    assert not choice_equivalent(None, "C")
    assert not choice_equivalent("", "")


# --- extract_final_number --------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    # SmolLM2-135M-Instruct's own greedy answers to "...\nGive the final answer as a number."
    ("Dan has 46 - 23 = 17 coins.\nThe answer is 17.", "17"),
    ("Leo has 26 stickers.\n26 + 2 = 32\nLeo has 32 stickers.\n#### 32\nThe answer is 32.", "32"),
    ("1. 5 jars\n2. 8 coins\n3. 5\n4. 10\n5. 10\n\nThe answer is 5.", "5"),
    ("1. 3 packs = 3 x 5 = 15 coins\n2. 3 packs * 5 coins = 15 coins", "15"),   # the last number
    ("19 + 28 = 57\nAnn has now 57 shells.", "57"),
    ("Ben has 7 + 2 = 9 apples now.\nThe answer is", "9"),     # cut off: the last number so far
    # precedence: box > #### > "answer is" > last number
    (r"the answer is 3, so \boxed{4} and 5", "4"),
    ("#### 7\nThe answer is 8. Then 9", "7"),
    ("The answer is 8. Checking: 8 + 1 = 9", "8"),
    ("first the answer: 2, then the answer is: **3**", "3"),
    ("The answer is $1,200.", "1200"),                           # separators and a full stop
    ("It is -4.5 degrees", "-4.5"),
    ("a half is 1/2", "1/2"),
    ("10-3=7", "7"),
    ("version x5 of the app", None),                             # a number inside a word
    ("no number here", None),
    ("", None),
])
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


def test_gsm8k_answers_grade_through_math_equivalence():
    # GSM8K's reference answers end with "#### N"; the grader reads N from either side.
    grader = get_grader("final_number")
    reference = grader.extract("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72")
    assert reference == "72"
    assert grader.equivalent(reference, grader.extract("She sold 72.0 clips in all."))
    assert not grader.equivalent(reference, grader.extract("She sold 27 clips."))
    assert not grader.equivalent(reference, grader.extract("She sold many clips."))


# --- registry --------------------------------------------------------------------------------

def test_get_grader():
    math = get_grader("math")
    assert math.extract(r"so \boxed{\frac{2}{4}}") == r"\frac{2}{4}"
    assert math.equivalent(r"\frac{2}{4}", "0.5")
    mc = get_grader("multiple_choice", choices="ABCDE")
    assert mc.extract("Answer: E") == "E"
    assert mc.equivalent("E", "(e)")
    num = get_grader("final_number")
    assert num.extract("12 * 4 = 48\nThe answer is 48.") == "48"
    assert num.equivalent("48", "48.0") and not num.equivalent("48", "84")
    assert set(GRADERS) == {"math", "final_number", "multiple_choice"}


def test_get_grader_unknown_lists_names():
    with pytest.raises(ValueError,
                       match=re.escape("accepted: math | final_number | multiple_choice")):
        get_grader("code")


def test_the_configs_grader_names_are_the_graders():
    """config/ cannot import rewards/: its list of names and the field's Literal must equal
    rewards.GRADERS, and each name builds a grader."""
    import typing

    from megatron_mgrpo.config import training
    from megatron_mgrpo.rewards import GRADERS, get_grader

    assert training.GRADER_NAMES == GRADERS
    hints = typing.get_type_hints(training.AlgorithmConfig)
    assert typing.get_args(hints["grader"]) == GRADERS
    for name in GRADERS:
        assert callable(get_grader(name, choices="ABCD").extract)
