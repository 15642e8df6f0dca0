"""GRPO group-relative advantages (step 5)."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["group_advantages"]


def group_advantages(
    rewards: torch.Tensor,
    keep: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    normalize_std: bool = True,
    filter_before_normalization: bool = True,
) -> torch.Tensor:
    """A_i = (r_i - mean_g) / (std_g + eps) within each prompt's group; [P, G] -> [P, G] float32.

    std is the unbiased sample standard deviation (divisor n - 1), as `torch.std` gives and as
    verl's and TRL's GRPO use. `normalize_std=False` gives Dr. GRPO's A_i = r_i - mean_g.

    `keep` (bool [P, G]) marks the trajectories that receive gradient (the IQR filter's verdict,
    or False for columns that only vote, like the momentum model's). Which trajectories form the
    group statistics:
      - filter_before_normalization=True: the kept ones only; a group with fewer than two kept
        has no defined std and gets 0;
      - False: all G, so the baseline is the full vote's; a group of G < 2 gets 0.
    Either way a dropped trajectory's advantage is exactly 0, and a group whose statistics rewards
    are all equal (zero variance: everyone agreed, or no signal) gets exactly 0, never NaN.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [P, G], got shape {tuple(rewards.shape)}")
    r = rewards.float()
    keep = torch.ones_like(r, dtype=torch.bool) if keep is None else keep.bool()
    if keep.shape != r.shape:
        raise ValueError(f"keep {tuple(keep.shape)} and rewards {tuple(r.shape)} differ in shape")
    stats = keep if filter_before_normalization else torch.ones_like(keep)

    zero = torch.zeros_like(r)
    n = stats.sum(-1, keepdim=True)
    mean = torch.where(stats, r, zero).sum(-1, keepdim=True) / n.clamp_min(1)
    centred = r - mean
    var = torch.where(stats, centred.square(), zero).sum(-1, keepdim=True) / (n - 1).clamp_min(1)
    advantages = centred / (var.sqrt() + eps) if normalize_std else centred

    # Exact zero for constant groups: (r - mean) can be a rounding residue like 1e-17, which
    # eps alone would turn into a small nonzero advantage.
    inf = torch.full_like(r, float("inf"))
    constant = (torch.where(stats, r, inf).amin(-1, keepdim=True)
                == torch.where(stats, r, -inf).amax(-1, keepdim=True))
    defined = (n >= 2) & ~constant
    return torch.where(keep & defined, advantages, zero)
