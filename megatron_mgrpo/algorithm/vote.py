"""Majority vote over a prompt's G = M + N completions: the pseudo-label (step 2 of the method)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

__all__ = ["VoteResult", "exact_match", "majority_vote", "pseudo_labels"]

Equivalent = Callable[[str, str], bool]


def exact_match(a: str, b: str) -> bool:
    """String equality: the default equivalence when no grader is given."""
    return a == b


@dataclass(frozen=True)
class VoteResult:
    """Outcome of one prompt's vote."""

    pseudo_label: Optional[str]
    """The majority answer, or None when the prompt has no learning signal (`has_signal`)."""

    majority_answer: Optional[str]
    """The majority answer even below `min_agreement` (for logging); None if no answer parsed."""

    agreement: float
    """Share of all G completions, unparseable ones included, that voted for the majority."""

    has_signal: bool
    """Some answer parsed and `agreement >= min_agreement`."""

    num_samples: int
    """G: completions in the group."""

    num_votes: int
    """Completions whose answer parsed (not None)."""

    cluster_sizes: tuple[int, ...]
    """Votes per equivalence cluster, clusters in order of their first member."""

    cluster_ids: tuple[Optional[int], ...]
    """Each completion's cluster index (None for an unparseable answer)."""

    majority_cluster: Optional[int]
    """Index of the winning cluster."""


def majority_vote(
    answers: Sequence[Optional[str]],
    equivalent: Equivalent = exact_match,
    min_agreement: float = 0.0,
) -> VoteResult:
    """Majority vote of one group of answers under an equivalence.

    Clustering: answers are visited in order; each joins the first existing cluster whose
    representative (first member) it is `equivalent` to, else opens a new cluster. A None answer
    (unparseable) casts no vote but counts in G, so

        agreement = |largest cluster| / G.

    Ties go to the tied cluster whose first member appears earliest: deterministic and
    independent of string order, so a vote never depends on hashing or sorting. The pseudo-label
    is that cluster's representative. If no answer parses, or agreement < min_agreement, the
    pseudo-label is None and `has_signal` is False. Costs at most G x (number of clusters) calls of
    `equivalent`.
    """
    if not 0.0 <= min_agreement <= 1.0:
        raise ValueError(f"min_agreement must be in [0, 1], got {min_agreement}")
    representatives: list[str] = []
    sizes: list[int] = []
    ids: list[Optional[int]] = []
    for answer in answers:
        if answer is None:
            ids.append(None)
            continue
        for c, rep in enumerate(representatives):
            if equivalent(rep, answer):
                sizes[c] += 1
                ids.append(c)
                break
        else:
            representatives.append(answer)
            sizes.append(1)
            ids.append(len(sizes) - 1)

    num_samples = len(answers)
    if not sizes:
        return VoteResult(None, None, 0.0, False, num_samples, 0, (), tuple(ids), None)
    # max() returns the first maximal index, i.e. the earliest-opened cluster among ties.
    winner = max(range(len(sizes)), key=sizes.__getitem__)
    agreement = sizes[winner] / num_samples
    has_signal = agreement >= min_agreement
    return VoteResult(
        pseudo_label=representatives[winner] if has_signal else None,
        majority_answer=representatives[winner],
        agreement=agreement,
        has_signal=has_signal,
        num_samples=num_samples,
        num_votes=sum(sizes),
        cluster_sizes=tuple(sizes),
        cluster_ids=tuple(ids),
        majority_cluster=winner,
    )


def pseudo_labels(
    groups: Sequence[Sequence[Optional[str]]],
    equivalent: Equivalent = exact_match,
    min_agreement: float = 0.0,
) -> list[VoteResult]:
    """`majority_vote` of every prompt's group, in order."""
    return [majority_vote(g, equivalent, min_agreement) for g in groups]
