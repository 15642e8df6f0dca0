"""Final answers of multiple-choice completions: a single option letter."""

from __future__ import annotations

import re
from typing import Optional

from megatron_mgrpo.rewards.math_answers import extract_boxed

__all__ = ["extract_choice", "normalize_choice", "choice_equivalent"]

_WRAPPER = re.compile(r"^\\(?:text|textbf|mathrm|mathbf)\{(.*)\}$")
# A letter alone, or leading an option's text: `C`, `(C)`, `[C]`, `C)`, `C.`, `C: 42`, `C 42`.
_LEADING_LETTER = re.compile(r"^[(\[]?([A-Za-z])(?:[)\].:]|\s|$)")
# "The answer is (C)", "Answer: C", "**Answer:** C", "the correct answer is option B."
# The letter must be upper case here: "the answer is a prime" is not option A.
_ANSWER_PHRASE = re.compile(
    r"(?i:answer)(?i:\s+is)?[\s:*]*(?i:(?:option|choice)\s+)?[(\[]?([A-Z])[)\]]?(?![A-Za-z0-9])")


def normalize_choice(answer: Optional[str], choices: str = "ABCD") -> Optional[str]:
    """The upper-case option letter that `answer` names (`(c)`, `\\text{C}`, `C. 42` -> `C`),
    or None when it names none of `choices`."""
    if not isinstance(answer, str):
        return None
    s = answer.strip().replace("$", "").strip()
    wrapped = _WRAPPER.match(s)
    if wrapped:
        s = wrapped.group(1).strip()
    m = _LEADING_LETTER.match(s)
    if m is None:
        return None
    letter = m.group(1).upper()
    return letter if letter in choices.upper() else None


def extract_choice(text: str, choices: str = "ABCD") -> Optional[str]:
    """The option letter a completion ends on, or None.

    In order: the last `\\boxed{...}` (`\\boxed{C}`, `\\boxed{(c)}`, `\\boxed{\\text{C}}`); else the
    last "answer is (C)" / "Answer: C" phrase; else a completion that is only a letter.
    """
    if not isinstance(text, str):
        return None
    boxed = extract_boxed(text)
    if boxed is not None:
        letter = normalize_choice(boxed, choices)
        if letter is not None:
            return letter
    valid = choices.upper()
    for m in reversed(list(_ANSWER_PHRASE.finditer(text))):
        if m.group(1) in valid:
            return m.group(1)
    stripped = text.strip().rstrip(".")
    if len(stripped) <= 3:
        return normalize_choice(stripped, choices)
    return None


def choice_equivalent(a: Optional[str], b: Optional[str]) -> bool:
    """Whether two answers name the same option letter (case, parentheses, `\\text{}` ignored).

    Any letter A-Z counts here: the choice set was already enforced by `extract_choice`.
    """
    la = normalize_choice(a, "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    return la is not None and la == normalize_choice(b, "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
