"""The final number of a completion, for answers that are plain numbers (GSM8K-style problems).

Small instruct models rarely write `\\boxed{}` but do end with "The answer is 87" or "= 87".
`extract_final_number` reads, in this order of precedence:

1. the last `\\boxed{...}`, as the math grader does;
2. the number after the last `####` (GSM8K's own answer marker);
3. the number after the last "answer is" / "answer:" (the phrasing lm-evaluation-harness's
   GSM8K "strict" filter and simple-evals read);
4. otherwise the last number in the text (lm-evaluation-harness's "flexible-extract").

Numbers lose thousands separators and a trailing full stop ("1,200." -> "1200"); a completion
with no number has no answer (None). Two answers are compared with `math_equivalent`, so "0.5"
and "1/2" agree.
"""

from __future__ import annotations

import re
from typing import Optional

from megatron_mgrpo.rewards.math_answers import extract_boxed

__all__ = ["extract_final_number"]

_NUMBER = r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?"
_HASHES = re.compile(r"####\s*\$?\s*(" + _NUMBER + ")")
_ANSWER_IS = re.compile(r"answer\s*(?:is\s*:?|:|=)\s*[*$\\(\s]*(" + _NUMBER + ")", re.IGNORECASE)
_ANY_NUMBER = re.compile(r"(?<![\w.])(" + _NUMBER + r")(?![\w/])")


def _last(pattern: "re.Pattern[str]", text: str) -> Optional[str]:
    found = None
    for found in pattern.finditer(text):
        pass
    return None if found is None else found.group(1).replace(",", "")


def extract_final_number(text: str) -> Optional[str]:
    """The completion's final answer (see the module docstring), or None."""
    if not isinstance(text, str):
        return None
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in (_HASHES, _ANSWER_IS, _ANY_NUMBER):
        number = _last(pattern, text)
        if number is not None:
            return number
    return None
