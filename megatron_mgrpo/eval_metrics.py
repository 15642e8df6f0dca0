"""Accuracy of sampled answers: pass@1 (mean over k samples), maj@k and unbiased pass@k.

One place for the arithmetic, used by the trainer's validation, the warm-up's base report and the
benchmark harness (`megatron_mgrpo.evaluation`).
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


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one problem with `c` of `n` samples correct (Chen et al. 2021):
    1 - C(n - c, k) / C(n, k), the chance that k samples drawn without replacement from the n
    contain a correct one; computed as a product so that large n does not overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def benchmark_scores(correct: Sequence[Sequence[bool]], ks: Sequence[int] = (),
                     answers: Optional[Sequence[Sequence[Optional[str]]]] = None,
                     equivalent: Optional[Callable[[str, str], bool]] = None
                     ) -> Dict[str, float]:
    """A benchmark's scores from each problem's n graded samples (`correct[p][j]`).

    - `pass@1`: mean over problems of the share of their n samples that are right (avg@n);
    - `pass@1_se`: its standard error over the n sample columns (how much the figure would move
      with another draw of samples; 0 when n = 1);
    - `pass@k` for each k in `ks` with 1 < k <= n: the unbiased estimator, averaged;
    - `maj@n` (when `answers` and `equivalent` are given): the majority vote of a problem's
      extracted answers is right, i.e. the first sample of the winning cluster is (ties as in
      `majority_vote`; no parsed answer: wrong).
    """
    if not correct:
        raise ValueError("benchmark_scores: no problems")
    n = len(correct[0])
    if n < 1 or any(len(row) != n for row in correct):
        raise ValueError("benchmark_scores: every problem needs the same number (>= 1) of "
                         f"samples, got {sorted({len(row) for row in correct})}")
    count = len(correct)
    out = {"pass@1": sum(sum(map(bool, row)) / n for row in correct) / count}
    columns = [sum(bool(row[j]) for row in correct) / count for j in range(n)]
    if n > 1:
        mean = sum(columns) / n
        var = sum((x - mean) ** 2 for x in columns) / (n - 1)
        out["pass@1_se"] = (var / n) ** 0.5
    else:
        out["pass@1_se"] = 0.0
    for k in sorted(set(ks)):
        if k > n:
            raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
        if k > 1:
            out[f"pass@{k}"] = sum(pass_at_k(n, sum(map(bool, row)), k)
                                   for row in correct) / count
    if answers is not None and equivalent is not None:
        if len(answers) != count:
            raise ValueError(f"benchmark_scores: {len(answers)} answer groups for {count} "
                             "problems")
        right = 0
        for row, group in zip(correct, answers):
            vote = majority_vote(group, equivalent)
            if vote.majority_cluster is not None:
                right += bool(row[vote.cluster_ids.index(vote.majority_cluster)])
        out[f"maj@{n}"] = right / count
    return out
