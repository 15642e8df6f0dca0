"""The momentum model's update (Eq. 1, step 7): theta_k <- m * theta_k + (1 - m) * theta_q."""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["check_momentum", "ema_step", "ema_update_"]


def check_momentum(momentum: float) -> None:
    """Raise ValueError unless 0 <= m < 1 (m = 1 would freeze the momentum model forever)."""
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")


def ema_step(ema: torch.Tensor, param: torch.Tensor, momentum: float) -> torch.Tensor:
    """Reference form of Eq. 1, out of place, in fp32: m * theta_k + (1 - m) * theta_q."""
    check_momentum(momentum)
    return momentum * ema.float() + (1.0 - momentum) * param.float()


@torch.no_grad()
def ema_update_(
    ema: Sequence[torch.Tensor], params: Sequence[torch.Tensor], momentum: float
) -> None:
    """In place, for every pair: theta_k <- m * theta_k + (1 - m) * theta_q.

    Two fused multi-tensor kernels (`_foreach_mul_`, `_foreach_add_`) over the whole list.

    The EMA must be fp32 (TypeError otherwise): bf16 keeps 8 significant bits, so the increment
    (1 - m) * (theta_q - theta_k) rounds away whenever it is below about |theta_k| * 2^-9, i.e.
    whenever theta_q is within roughly 20% of theta_k at m = 0.99: on every realistic step, and
    the momentum model never moves. `params` may be bf16 or fp16: the in-place add promotes them
    to fp32 element by element, without an fp32 copy of the model.
    """
    check_momentum(momentum)
    if len(ema) != len(params):
        raise ValueError(f"{len(ema)} EMA tensors but {len(params)} parameters")
    for i, (e, p) in enumerate(zip(ema, params)):
        if e.dtype != torch.float32:
            raise TypeError(f"EMA tensor {i} is {e.dtype}; the EMA must be torch.float32")
        if e.shape != p.shape:
            raise ValueError(f"EMA tensor {i} has shape {tuple(e.shape)}, "
                             f"parameter {tuple(p.shape)}")
    if not ema:
        return
    ema = list(ema)
    params = [p.detach() for p in params]
    torch._foreach_mul_(ema, momentum)
    torch._foreach_add_(ema, params, alpha=1.0 - momentum)
