"""Per-step signs of collapse, from the step's answers and entropies: plain floats to log.

Self-training fails by agreeing with itself (design.md, "When self-training can work at all"):
the vote grows unanimous, the answers stop varying and the entropy falls, while accuracy drops.
These measure that on every step; `collapse.CollapseWatch` turns them into alarms.

Conventions, shared by every function here:
- A group is one prompt's G = M + N answers, columns [0, M) the policy's, [M, G) the momentum
  model's (the order `step.rl_step` samples them in).
- An unparseable answer (None) counts in G but forms no cluster, as in the vote
  (`vote.majority_vote`): it is in the margin's denominator, never a cluster of its own.
- Clusters are the vote's: equivalence under the grader's `equivalent`, first member first.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from megatron_mgrpo.algorithm.vote import Equivalent, VoteResult, exact_match, majority_vote

__all__ = ["vote_margin", "all_identical", "policy_momentum_agreement", "vote_diagnostics",
           "entropy_quartiles"]


def vote_margin(vote: VoteResult) -> float:
    """(top cluster's size - runner-up's size) / G for one group: 1 when all G agree, 0 on a
    tie for first. With one cluster the runner-up has 0; with no parsed answer (or G = 0) the
    margin is 0 (nothing was voted for)."""
    if not vote.cluster_sizes or vote.num_samples == 0:
        return 0.0
    top, *rest = sorted(vote.cluster_sizes, reverse=True)
    return (top - (rest[0] if rest else 0)) / vote.num_samples


def all_identical(vote: VoteResult) -> bool:
    """All G answers parsed and fell into one cluster (an unparseable one breaks it)."""
    return len(vote.cluster_sizes) == 1 and vote.num_votes == vote.num_samples


def policy_momentum_agreement(groups: Sequence[Sequence[Optional[str]]], num_policy: int,
                              equivalent: Equivalent = exact_match) -> Optional[float]:
    """Share of prompts where the majority of the policy's M answers is equivalent to the
    majority of the momentum model's N answers (each majority by `majority_vote` over its own
    answers, same tie rule). A prompt where either side parsed no answer counts as a
    disagreement. None when there are no momentum answers (N = 0: srt, ttrl, rlvr), so that
    the figure is absent there rather than 0; 0.0 for no prompts."""
    if not groups:
        return 0.0
    if all(len(g) <= num_policy for g in groups):
        return None
    same = 0
    for g in groups:
        mine = majority_vote(g[:num_policy], equivalent).majority_answer
        theirs = majority_vote(g[num_policy:], equivalent).majority_answer
        same += mine is not None and theirs is not None and bool(equivalent(mine, theirs))
    return same / len(groups)


def vote_diagnostics(votes: Sequence[VoteResult], groups: Sequence[Sequence[Optional[str]]],
                     num_policy: int, equivalent: Equivalent = exact_match) -> Dict[str, float]:
    """The step's vote figures, each a mean over prompts (`votes`: the step's vote over all G,
    `groups`: the answers it was taken over):

    - `vote_margin`: `vote_margin` per prompt;
    - `all_identical_frac`: share of prompts with `all_identical` answers;
    - `distinct_answers`: clusters per prompt (0 for a group with no parsed answer);
    - `policy_momentum_agreement`: `policy_momentum_agreement`, only when there are momentum
      answers (the key is left out otherwise).
    """
    n = max(len(votes), 1)
    out = {"vote_margin": sum(vote_margin(v) for v in votes) / n,
           "all_identical_frac": sum(all_identical(v) for v in votes) / n,
           "distinct_answers": sum(len(v.cluster_sizes) for v in votes) / n}
    agreement = policy_momentum_agreement(groups, num_policy, equivalent)
    if agreement is not None:
        out["policy_momentum_agreement"] = agreement
    return out


def entropy_quartiles(traj_entropy: torch.Tensor, valid: Optional[torch.Tensor] = None
                      ) -> Tuple[float, float, float]:
    """(q25, q50, q75) of the trajectory entropies marked `valid`, with the IQR filter's
    quantile rule (`torch.quantile`, linear interpolation, in float64), so that q25 and q75 are
    the filter's Q1 and Q3 over the same trajectories. NaN for each when none is valid."""
    h = traj_entropy.detach().double().reshape(-1)
    if valid is not None:
        h = h[valid.bool().reshape(-1)]
    if h.numel() == 0:
        return float("nan"), float("nan"), float("nan")
    q = torch.quantile(h, torch.tensor([0.25, 0.5, 0.75], dtype=h.dtype, device=h.device),
                       interpolation="linear")
    return float(q[0]), float(q[1]), float(q[2])
