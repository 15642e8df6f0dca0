"""Answer graders: how a completion's final answer is extracted and compared.

A `Grader` is a pair of pure functions. The vote clusters answers with `equivalent`, and the
reward of a completion is `equivalent(answer, pseudo_label)`; neither knows the task.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

from megatron_mgrpo.rewards.final_number import extract_final_number
from megatron_mgrpo.rewards.math_answers import extract_boxed, math_equivalent, normalize_answer
from megatron_mgrpo.rewards.multiple_choice import (
    choice_equivalent,
    extract_choice,
    normalize_choice,
)

__all__ = [
    "GRADERS",
    "Grader",
    "get_grader",
    "extract_boxed",
    "extract_final_number",
    "math_equivalent",
    "normalize_answer",
    "extract_choice",
    "choice_equivalent",
    "normalize_choice",
]


@dataclass(frozen=True)
class Grader:
    """`extract(completion) -> answer or None`; `equivalent(a, b) -> bool` (symmetric)."""

    extract: Callable[[str], Optional[str]]
    equivalent: Callable[[str, str], bool]


GRADERS = ("math", "final_number", "multiple_choice")


def get_grader(name: str, choices: str = "ABCD") -> Grader:
    """The grader called `name` (one of `GRADERS`); `choices` are the option letters of
    `multiple_choice` (e.g. "ABCDEFGHIJ" for ten options)."""
    if name == "math":
        return Grader(extract=extract_boxed, equivalent=math_equivalent)
    if name == "final_number":
        return Grader(extract=extract_final_number, equivalent=math_equivalent)
    if name == "multiple_choice":
        return Grader(extract=functools.partial(extract_choice, choices=choices),
                      equivalent=choice_equivalent)
    raise ValueError(f"unknown grader {name!r}; accepted: {' | '.join(GRADERS)}")
