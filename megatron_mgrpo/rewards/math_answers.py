"""Final answers of math completions: extract the last `\\boxed{...}`, compare by equivalence.

Equivalence is decided in three tiers, cheapest first:

1. the two answers are equal after a plain normalisation (whitespace, `$`, `\\left`/`\\right`,
   spacing commands, `\\dfrac`, thousands separators, a trailing full stop);
2. both are plain numbers (integers, decimals, `a/b`, `\\frac{a}{b}`) with equal exact values;
3. `math_verify` parses both into SymPy and `verify` says they are equal, in either direction
   (`verify` treats its first argument as the gold answer and is not quite symmetric; a vote
   needs a symmetric relation).

Answers known to keep SymPy busy for seconds to minutes (longer than MAX_SYMPY_CHARS, power
towers like `10^{10^{10}}`, exponents of six digits or more, factorials of expressions) are judged
by tiers 1-2 only. Nothing here raises on odd input: unparseable answers are simply not
equivalent to anything. Parses and comparisons are cached (`functools.lru_cache`): a training
step compares the same few strings thousands of times.
"""

from __future__ import annotations

import re
import threading
import time
from fractions import Fraction
from functools import lru_cache
from typing import Optional

__all__ = ["extract_boxed", "normalize_answer", "math_equivalent", "clear_caches"]

# math_verify's timeout is `signal.alarm`, which only works in the main thread (elsewhere it raises
# ValueError). We use it there and run without one in worker threads; in both, the inputs known to
# make SymPy run for minutes (see the module docstring) never reach it. The alarm, when used,
# cancels any SIGALRM the caller had pending.
TIMEOUT_SECONDS = 2
MAX_SYMPY_CHARS = 256
_HUGE_POWER = re.compile(r"\^\s*\{[^{}]*\^|\^\s*\{?\s*[+-]?\d{6,}")  # 10^{10^{10}}, 10^{1000000}
_BIG_FACTORIAL = re.compile(r"(?:[)}]|\d{5,})\s*!")       # (10^{100})!, 100000!
_CACHE_SIZE = 1 << 16

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def extract_boxed(text: str) -> Optional[str]:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`) in `text`.

    Braces nest and `\\{`, `\\}` are literal, so `\\boxed{\\{1, \\frac{1}{2}\\}}` gives
    `\\{1, \\frac{1}{2}\\}`. Only the last command counts: if it is never closed (a truncated
    completion) or empty, the answer is None rather than an earlier box. The unbraced form takes
    the run of characters up to whitespace or `$`.
    """
    if not isinstance(text, str):
        return None
    last = None
    for last in _BOX_COMMAND.finditer(text):
        pass
    if last is None:
        return None
    i = last.end()
    n = len(text)
    while i < n and text[i].isspace():
        i += 1
    if i == n:
        return None
    if text[i] != "{":
        if i == last.end():  # `\boxedx` is another command, not a box
            return None
        j = i
        while j < n and not text[j].isspace() and text[j] != "$":
            j += 1
        return text[i:j] or None
    depth = 0
    j = i
    while j < n:
        c = text[j]
        if c == "\\":
            j += 2  # an escaped character, `\{` and `\}` included, never opens or closes
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                content = text[i + 1:j].strip()
                return content or None
        j += 1
    return None


_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_SPACING = re.compile(r"\\[!,;: ]|\\q?quad(?![A-Za-z])")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
_TEXT_WRAPPER = re.compile(r"^\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}$")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
# Exponents are capped at three digits: Fraction("1e999999999") would build a billion-digit int.
_DECIMAL = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d{1,3})?$")
_SLASH_FRACTION = re.compile(r"^([+-]?\d+)/([+-]?\d+)$")
_LATEX_FRACTION = re.compile(r"^([+-]?)\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}$")
_WORD = re.compile(r"^[A-Za-z]{2,}$")


def normalize_answer(answer: str) -> str:
    """Plain textual normal form of an answer, used before (and instead of) SymPy.

    Removes whitespace, unescaped `$`, `\\left`/`\\right`, spacing commands (`\\!`, `\\,`, ...),
    a `\\text{}`-style wrapper, a trailing full stop, and thousands separators of a lone number
    (`1,000` and `1{,}000` -> `1000`; a tuple `(1,234)` is left alone); `\\dfrac`/`\\tfrac` ->
    `\\frac`.
    """
    s = _UNESCAPED_DOLLAR.sub("", answer)
    s = _LEFT_RIGHT.sub("", s)
    s = _SPACING.sub("", s)
    s = "".join(s.split())
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("{,}", ",")
    wrapped = _TEXT_WRAPPER.match(s)
    if wrapped:
        s = wrapped.group(1)
    s = s.rstrip(".")
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    return s


def _as_number(s: str) -> Optional[Fraction]:
    """Exact value of a normalised plain number (`3`, `-0.5`, `1e3`, `1/2`, `\\frac{1}{2}`)."""
    try:
        if _DECIMAL.match(s):
            return Fraction(s)
        m = _SLASH_FRACTION.match(s)
        if m:
            return Fraction(int(m.group(1)), int(m.group(2)))
        m = _LATEX_FRACTION.match(s)
        if m:
            value = Fraction(int(m.group(2)), int(m.group(3)))
            return -value if m.group(1) == "-" else value
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return None


def _timeout() -> Optional[int]:
    return TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=_CACHE_SIZE)
def _sympy_parse(answer: str) -> tuple:
    """math_verify's parse of `$answer$`, keeping only SymPy results (strings are tier 1's job)."""
    try:
        from math_verify import parse
        from math_verify.errors import TimeoutException
    except ImportError:  # graded by tiers 1-2 alone
        return ()
    try:
        parsed = parse(f"${answer}$", parsing_timeout=_timeout())
    except (Exception, TimeoutException):
        return ()
    return tuple(p for p in parsed if not isinstance(p, str))


def _too_costly_for_sympy(answer: str) -> bool:
    return (len(answer) > MAX_SYMPY_CHARS or _HUGE_POWER.search(answer) is not None
            or _BIG_FACTORIAL.search(answer) is not None)


@lru_cache(maxsize=_CACHE_SIZE)
def _sympy_equivalent(a: str, b: str) -> bool:
    """`verify` in both directions; called with (a, b) sorted so the cache is symmetric."""
    pa, pb = _sympy_parse(a), _sympy_parse(b)
    if not pa or not pb:
        return False
    try:
        from math_verify import verify
        from math_verify.errors import TimeoutException
    except ImportError:
        return False
    timeout = _timeout()
    try:
        start = time.monotonic()
        if verify(list(pa), list(pb), timeout_seconds=timeout):
            return True
        if timeout is not None and time.monotonic() - start >= timeout:
            return False  # timed out (verify returns False then): don't wait a second time
        return bool(verify(list(pb), list(pa), timeout_seconds=timeout))
    except (Exception, TimeoutException):
        return False


def math_equivalent(a: Optional[str], b: Optional[str]) -> bool:
    """Whether two final answers are mathematically equal: `\\frac{1}{2}` ~ `0.5` ~ `1/2`.

    Symmetric; False when either side is None, empty or unparseable. Two bare words of letters
    (`east`, `seat`) are compared as text, because SymPy would read them as commuting products
    of symbols and call them equal.
    """
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    return _math_equivalent(a, b)


@lru_cache(maxsize=_CACHE_SIZE)
def _math_equivalent(a: str, b: str) -> bool:
    na, nb = normalize_answer(a), normalize_answer(b)
    if not na or not nb:
        return False
    if na == nb:
        return True
    xa, xb = _as_number(na), _as_number(nb)
    if xa is not None and xb is not None and xa == xb:
        return True
    if _WORD.match(na) and _WORD.match(nb):
        return na.lower() == nb.lower()
    if _too_costly_for_sympy(na) or _too_costly_for_sympy(nb):
        return False
    # math_verify does its own LaTeX normalisation; give it the text with only `$` removed.
    sa = _UNESCAPED_DOLLAR.sub("", a).strip()
    sb = _UNESCAPED_DOLLAR.sub("", b).strip()
    if sa > sb:
        sa, sb = sb, sa
    return _sympy_equivalent(sa, sb)


def clear_caches() -> None:
    """Forget all cached parses and comparisons (tests; or to bound memory in a long run)."""
    _math_equivalent.cache_clear()
    _sympy_equivalent.cache_clear()
    _sympy_parse.cache_clear()
