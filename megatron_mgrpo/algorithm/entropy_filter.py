"""Trajectory entropy and the IQR entropy filter (Eq. 2, step 4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["IQRFilterResult", "trajectory_entropy", "iqr_entropy_filter"]


def trajectory_entropy(token_entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """H(tau) = mean over the completion's tokens of the per-token entropy; [B, T] -> [B].

    `token_entropy[b, t]` is the policy's full-vocabulary entropy at completion token t and
    `mask` marks the completion's tokens. A row with no tokens gets 0. Padding is selected away
    with `where`, not multiplied by 0, so NaN or inf there cannot leak in.
    """
    if token_entropy.shape != mask.shape:
        raise ValueError(f"token_entropy {tuple(token_entropy.shape)} and mask "
                         f"{tuple(mask.shape)} differ in shape")
    mask = mask.bool()
    total = torch.where(mask, token_entropy, torch.zeros_like(token_entropy)).sum(-1)
    count = mask.sum(-1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


@dataclass(frozen=True)
class IQRFilterResult:
    """Which trajectories the filter keeps, and the statistics to log."""

    keep: torch.Tensor
    """bool [B]: valid and not dropped."""

    dropped_by_iqr: torch.Tensor
    """bool [B]: valid with H < fence."""

    dropped_by_floor: torch.Tensor
    """bool [B]: valid with H < entropy_floor (may overlap `dropped_by_iqr`)."""

    q1: float
    q3: float
    iqr: float
    fence: float
    """Q1 - k * IQR. NaN (with q1, q3, iqr) when there is no valid trajectory."""

    num_valid: int
    num_dropped: int
    """Valid trajectories not kept, by either rule."""

    num_dropped_by_iqr: int
    num_dropped_by_floor: int


def iqr_entropy_filter(
    traj_entropy: torch.Tensor,
    k: float = 0.75,
    valid: Optional[torch.Tensor] = None,
    entropy_floor: Optional[float] = None,
) -> IQRFilterResult:
    """Drop trajectories whose entropy is a low outlier of the batch: keep H >= Q1 - k * IQR.

    Q1 and Q3 are the 0.25 and 0.75 quantiles of H over the valid trajectories, with
    `torch.quantile`'s linear interpolation (numpy's default method): for sorted values
    x_0..x_{n-1}, q(p) = x_j + (x_{j+1} - x_j) * frac(p * (n - 1)), j = floor(p * (n - 1)).
    IQR = Q3 - Q1. The comparison is strict (H < fence is dropped), so a batch of equal
    entropies drops nothing. With one valid trajectory the fence is its own entropy and drops
    nothing. The fence is relative: a batch whose entropy collapses together passes, hence the
    optional absolute `entropy_floor` (drop H < floor), counted separately.

    Invalid rows (`valid` False: e.g. prompts without signal) never enter the statistics and are
    never kept. The batch is the caller's: under data parallelism gather H (and `valid`) over the
    data-parallel group first, so every rank computes the same fence. The statistics come back
    as Python floats (one device sync per call).
    """
    if k < 0:
        raise ValueError(f"iqr k must be >= 0, got {k}")
    if traj_entropy.dim() != 1:
        raise ValueError(f"traj_entropy must be 1-D [B], got shape {tuple(traj_entropy.shape)}")
    h = traj_entropy.detach().double()
    valid = torch.ones_like(h, dtype=torch.bool) if valid is None else valid.bool()
    if valid.shape != h.shape:
        raise ValueError(f"valid {tuple(valid.shape)} and traj_entropy {tuple(h.shape)} differ")
    num_valid = int(valid.sum())

    if num_valid > 0:
        q = torch.quantile(h[valid], torch.tensor([0.25, 0.75], dtype=h.dtype, device=h.device),
                           interpolation="linear")
        q1, q3 = float(q[0]), float(q[1])
        iqr = q3 - q1
        fence = q1 - k * iqr
        dropped_by_iqr = valid & (h < fence)
    else:
        q1 = q3 = iqr = fence = float("nan")
        dropped_by_iqr = torch.zeros_like(valid)

    if entropy_floor is not None:
        dropped_by_floor = valid & (h < entropy_floor)
    else:
        dropped_by_floor = torch.zeros_like(valid)

    keep = valid & ~dropped_by_iqr & ~dropped_by_floor
    return IQRFilterResult(
        keep=keep,
        dropped_by_iqr=dropped_by_iqr,
        dropped_by_floor=dropped_by_floor,
        q1=q1,
        q3=q3,
        iqr=iqr,
        fence=fence,
        num_valid=num_valid,
        num_dropped=num_valid - int(keep.sum()),
        num_dropped_by_iqr=int(dropped_by_iqr.sum()),
        num_dropped_by_floor=int(dropped_by_floor.sum()),
    )
