"""M-GRPO and its baselines as one loop with parts switched on or off.

| mode  | rollouts per prompt          | label                    | trained on                   |
| ----- | ---------------------------- | ------------------------ | ---------------------------- |
| mgrpo | M policy + N momentum (N>=1) | vote over all M + N      | the M policy completions     |
| srt   | M policy (N = 0)             | vote over the M          | the M                        |
| ttrl  | M policy (N = 0)             | vote over the M          | a random num_train of the M  |
| rlvr  | M policy (N = 0)             | ground truth             | the M                        |

The IQR entropy filter is a switch of its own (M-GRPO + IQR is the paper's second variant; the
baselines run without it). With `train_on_momentum_rollouts` M-GRPO also trains on the N
momentum completions (off-policy, importance-weighted by their recorded log-probabilities).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch

__all__ = ["MODES", "ModePlan", "plan_for_mode", "select_training_subset"]

MODES = ("mgrpo", "srt", "ttrl", "rlvr")


@dataclass(frozen=True)
class ModePlan:
    """What one training step does in a mode."""

    mode: str
    num_policy: int
    """M: completions per prompt from the policy."""
    num_momentum: int
    """N: completions per prompt from the momentum model."""
    use_momentum_model: bool
    """Keep the EMA (Eq. 1) and sample N completions from it."""
    use_vote: bool
    """The label is the majority vote; False (rlvr): the dataset's ground truth."""
    use_iqr_filter: bool
    """Apply the IQR entropy filter (Eq. 2) to the trained completions."""
    num_train: int
    """How many of the M policy completions per prompt get gradient (M except in ttrl)."""
    train_on_momentum_rollouts: bool
    """The N momentum completions get gradient too (importance-weighted)."""

    @property
    def group_size(self) -> int:
        """G = M + N: completions per prompt, all of which vote."""
        return self.num_policy + self.num_momentum

    @property
    def train_subset(self) -> bool:
        """Train on a random subset of the policy completions (ttrl with num_train < M)."""
        return self.num_train < self.num_policy


def plan_for_mode(
    mode: str,
    num_policy: int,
    num_momentum: int = 0,
    iqr_filter: bool = False,
    num_train: Optional[int] = None,
    train_on_momentum_rollouts: bool = False,
) -> ModePlan:
    """The `ModePlan` of `mode` (one of MODES), or a ValueError naming the offending setting.

    Rules: M >= 1, N >= 0 and M + N >= 2 (a vote, and a group-relative advantage, need two
    completions); mgrpo needs N >= 1 (N = 0 is srt); srt, ttrl and rlvr need N = 0; num_train is
    ttrl's alone, in [1, M], defaulting to M; train_on_momentum_rollouts is mgrpo's alone.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; accepted: {' | '.join(MODES)}")
    if num_policy < 1:
        raise ValueError(f"num_policy (M) must be >= 1, got {num_policy}")
    if num_momentum < 0:
        raise ValueError(f"num_momentum (N) must be >= 0, got {num_momentum}")
    if num_policy + num_momentum < 2:
        raise ValueError(f"num_policy + num_momentum (M + N) must be >= 2 in mode {mode}: a vote "
                         f"and a group-relative advantage need two completions per prompt")
    if mode == "mgrpo" and num_momentum < 1:
        raise ValueError("mode mgrpo needs num_momentum (N) >= 1; with N = 0 use mode srt")
    if mode != "mgrpo" and num_momentum != 0:
        raise ValueError(f"mode {mode} samples only from the policy: num_momentum (N) must be 0, "
                         f"got {num_momentum}")
    if train_on_momentum_rollouts and mode != "mgrpo":
        raise ValueError(f"train_on_momentum_rollouts applies to mode mgrpo only, not {mode}")
    if num_train is None:
        num_train = num_policy
    elif mode != "ttrl":
        if num_train != num_policy:
            raise ValueError(f"num_train applies to mode ttrl only; mode {mode} trains on all "
                             f"M={num_policy} policy completions")
    elif not 1 <= num_train <= num_policy:
        raise ValueError(f"ttrl num_train must be in [1, num_policy={num_policy}], got {num_train}")

    return ModePlan(
        mode=mode,
        num_policy=num_policy,
        num_momentum=num_momentum,
        use_momentum_model=mode == "mgrpo",
        use_vote=mode != "rlvr",
        use_iqr_filter=bool(iqr_filter),
        num_train=num_train,
        train_on_momentum_rollouts=bool(train_on_momentum_rollouts),
    )


def select_training_subset(
    num_samples: int, num_train: int, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """TTRL: `num_train` distinct indices out of `num_samples`, uniformly at random, sorted;
    int64 [num_train]. The same seeded `generator` state gives the same subset."""
    import torch  # here: the mode rules above are read by config validation, without torch

    if not 1 <= num_train <= num_samples:
        raise ValueError(f"num_train must be in [1, num_samples={num_samples}], got {num_train}")
    return torch.randperm(num_samples, generator=generator)[:num_train].sort().values
