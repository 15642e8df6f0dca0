"""Binary rewards against a label (step 3): the pseudo-label, or the ground truth for RLVR."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from megatron_mgrpo.algorithm.vote import exact_match

__all__ = ["binary_rewards", "group_binary_rewards"]


def binary_rewards(
    answers: Sequence[Optional[str]],
    label: Optional[str],
    equivalent: Callable[[str, str], bool] = exact_match,
) -> torch.Tensor:
    """r_i = 1 if answer_i is equivalent to the label, else 0; float32 [G].

    An unparseable answer (None) gets 0; a missing label (a prompt without signal) gives all 0,
    which `group_advantages` turns into zero advantages. The same function serves RLVR with the
    ground-truth answer as `label`. The label is passed first to `equivalent` (graders are
    symmetric; math_verify's gold argument comes first).
    """
    if label is None:
        return torch.zeros(len(answers), dtype=torch.float32)
    return torch.tensor(
        [0.0 if a is None else float(bool(equivalent(label, a))) for a in answers],
        dtype=torch.float32,
    )


def group_binary_rewards(
    groups: Sequence[Sequence[Optional[str]]],
    labels: Sequence[Optional[str]],
    equivalent: Callable[[str, str], bool] = exact_match,
) -> torch.Tensor:
    """`binary_rewards` of P equal-sized groups against their labels, stacked to float32 [P, G]."""
    if len(groups) != len(labels):
        raise ValueError(f"{len(groups)} groups but {len(labels)} labels")
    sizes = {len(g) for g in groups}
    if len(sizes) > 1:
        raise ValueError(f"groups must all have the same size, got sizes {sorted(sizes)}")
    if not groups:
        return torch.zeros(0, 0, dtype=torch.float32)
    return torch.stack([binary_rewards(g, y, equivalent) for g, y in zip(groups, labels)])
