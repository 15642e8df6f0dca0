"""Accuracy of sampled answers against true ones: pass@1 (mean over k samples) and maj@k.

One place for the arithmetic, used by the trainer's validation and the warm-up's base report.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

from megatron_mgrpo.algorithm.vote import majority_vote


def sample_accuracy(answers: Sequence[Sequence[Optional[str]]], truths: Sequence[str],
                    equivalent: Callable[[str, str], bool]) -> Dict[str, float]:
    """Means over prompts of: `pass@1` (share of a prompt's k answers equivalent to the truth),
    `maj@k` (the majority vote's answer is), `parsed` (share of answers that parsed),
    `agreement` (the vote's majority share) and `distinct_wrong_share` (distinct wrong answers
    / wrong answers: near 1 when errors scatter, which is what makes a vote informative)."""
    if len(answers) != len(truths) or not truths:
        raise ValueError(f"need one truth per prompt and at least one prompt, got "
                         f"{len(answers)} answer groups and {len(truths)} truths")
    total = dict.fromkeys(("pass@1", "maj@k", "parsed", "agreement", "distinct_wrong_share"),
                          0.0)
    for group, truth in zip(answers, truths):
        k = len(group)
        right = [a is not None and bool(equivalent(truth, a)) for a in group]
        total["pass@1"] += sum(right) / k
        total["parsed"] += sum(a is not None for a in group) / k
        vote = majority_vote(group, equivalent)
        total["maj@k"] += float(vote.majority_answer is not None
                                and bool(equivalent(truth, vote.majority_answer)))
        total["agreement"] += vote.agreement
        wrong = [a for a, ok in zip(group, right) if a is not None and not ok]
        total["distinct_wrong_share"] += len(set(wrong)) / len(wrong) if wrong else 1.0
    return {key: value / len(truths) for key, value in total.items()}
