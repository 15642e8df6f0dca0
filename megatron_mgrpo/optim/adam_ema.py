"""AdamW with the momentum model's EMA folded into the same pass over the parameters.

A drop-in for the `torch.optim.AdamW` that megatron-core's optimizers wrap (same math, same
state keys, same per-parameter "step" tensors, so megatron's checkpointing of the Adam state
is unchanged). Each parameter may carry an fp32 EMA tensor of its own shape (`attach_ema`);
when `ema_momentum` is set for a step, that step also does, right after the parameter update,

    ema <- m * ema + (1 - m) * param

The parameters here are the optimizer's *main* params: with megatron's distributed optimizer,
this rank's fp32 shard of each parameter, so the EMA is sharded exactly like the Adam moments.

GPU path: one Triton kernel per tensor (`triton_adam_ema`). CPU path (and the reference):
`torch._foreach_*` kernels applied tile by tile, each tile a few hundred KiB of every tensor,
so temporaries stay small and the EMA reads each freshly updated tile while it is in cache (on
the 2-core CI machine that measures no faster than a separate EMA pass: benchmarks/README.md).
Elementwise it runs the same operations in the same order as torch's AdamW and as
`algorithm.ema_update_`, so its results equal theirs bit for bit.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch

from megatron_mgrpo.algorithm import check_momentum
from megatron_mgrpo.optim.triton_adam_ema import adam_ema_triton_
from megatron_mgrpo.optim.triton_adam_ema import HAVE_TRITON

TILE = 1 << 15
"""Elements per tile and tensor: 128 KiB of fp32 each, five tensors in flight (L2-sized)."""


class AdamEMA(torch.optim.Optimizer):
    """torch.optim.AdamW (decoupled weight decay, no amsgrad) plus an optional fused EMA."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, tile: int = TILE,
                 backend: str = "auto"):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamEMA: invalid lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))
        self.tile = tile
        if backend not in ("auto", "foreach", "triton"):
            raise ValueError(f"AdamEMA backend: got {backend!r}; accepted: auto | foreach | triton")
        self.backend = backend
        """`triton`: the fused kernel (GPU, or Triton's interpreter); `foreach`: the tiled
        multi-tensor path; `auto`: Triton for fp32 CUDA tensors when it is installed."""
        self.ema: Dict[torch.Tensor, torch.Tensor] = {}
        self.ema_momentum: Optional[float] = None
        """Set for one step to fold the updated params into their EMA; cleared by `step`."""
        self.ema_updated = False
        """Whether the last `step` updated the EMA."""

    @classmethod
    def replacing(cls, adam: torch.optim.Optimizer) -> "AdamEMA":
        """An AdamEMA over `adam`'s param groups and state: the same objects, which megatron
        also holds (its main-param shards are views, which torch would not take as params)."""
        if adam.defaults.get("amsgrad") or adam.defaults.get("maximize"):
            raise ValueError("AdamEMA: amsgrad / maximize are not supported")
        if not (isinstance(adam, torch.optim.AdamW) or adam.defaults.get("adam_w_mode", True)):
            raise ValueError(f"AdamEMA replaces AdamW only, got {type(adam).__name__}")
        d = adam.defaults
        out = cls([torch.zeros(0, requires_grad=True)], lr=d["lr"], betas=d["betas"],
                  eps=d["eps"], weight_decay=d["weight_decay"])
        out.param_groups = adam.param_groups
        out.state = adam.state
        return out

    def attach_ema(self, pairs: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """(param, fp32 EMA tensor of the same shape) for every param that has one."""
        for p, e in pairs:
            if e.dtype != torch.float32 or e.shape != p.shape:
                raise ValueError(f"EMA must be fp32 of the param's shape {tuple(p.shape)}, got "
                                 f"{e.dtype} {tuple(e.shape)}")
            self.ema[p] = e

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        m, self.ema_momentum = self.ema_momentum, None
        if m is not None:
            check_momentum(m)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p,
                                                           memory_format=torch.preserve_format)
                if "step" not in state:
                    # Megatron restores the count per param (torch AdamW) or per group (TE's
                    # FusedAdam, with Transformer Engine installed): take either.
                    state["step"] = torch.tensor(float(group.get("step", 0)))
                state["step"] += 1
            # One step count per group: megatron keeps them equal (and checkpoints one).
            t = float(self.state[params[0]]["step"])
            group["step"] = int(t)
            with_ema = m is not None and all(p in self.ema for p in params)
            if m is not None and not with_ema and any(p in self.ema for p in params):
                raise RuntimeError("AdamEMA: some params of a group have an EMA and some not")
            args = (params, [p.grad for p in params],
                    [self.state[p]["exp_avg"] for p in params],
                    [self.state[p]["exp_avg_sq"] for p in params],
                    [self.ema[p] for p in params] if with_ema else None)
            hyper = dict(step=t, lr=group["lr"], beta1=group["betas"][0],
                         beta2=group["betas"][1], eps=group["eps"],
                         weight_decay=group["weight_decay"], momentum=m if with_ema else None)
            if _use_triton_for(self.backend, params):
                adam_ema_triton_(*args, **hyper)
            else:
                adam_ema_foreach_(*args, **hyper, tile=self.tile)
        self.ema_updated = m is not None
        return loss


def _use_triton_for(backend: str, params: List[torch.Tensor]) -> bool:
    if backend == "foreach":
        return False
    if backend == "triton":
        return True
    return (HAVE_TRITON and params[0].is_cuda
            and all(p.dtype == torch.float32 and p.is_contiguous() for p in params))


def _tiles(tensors: List[torch.Tensor], tile: int) -> List[Tuple[int, int, int]]:
    """(tensor index, start, end) over the flattened tensors, at most `tile` elements each."""
    out = []
    for i, t in enumerate(tensors):
        n = t.numel()
        out.extend((i, s, min(s + tile, n)) for s in range(0, n, tile))
    return out


def _batches(tiles, tile: int):
    """Group tiles so each batch holds about `tile` elements (small tensors share a batch)."""
    batch, size = [], 0
    for tl in tiles:
        batch.append(tl)
        size += tl[2] - tl[1]
        if size >= tile:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


@torch.no_grad()
def adam_ema_foreach_(params: List[torch.Tensor], grads: List[torch.Tensor],
                      exp_avgs: List[torch.Tensor], exp_avg_sqs: List[torch.Tensor],
                      emas: Optional[List[torch.Tensor]], *, step: float, lr: float,
                      beta1: float, beta2: float, eps: float, weight_decay: float,
                      momentum: Optional[float], tile: int = TILE) -> None:
    """One AdamW step (step count `step`, already incremented) on every tensor, then, with
    `emas` and `momentum`, ema <- m * ema + (1 - m) * param; all in place, tile by tile.

    The operations are torch AdamW's (`_single_tensor_adam`), in its order; the EMA's are
    `ema_update_`'s. Contiguous tensors only (megatron's main params and shards are).
    """
    tensors = [params, grads, exp_avgs, exp_avg_sqs] + ([emas] if emas is not None else [])
    flat = [[t.view(-1) for t in ts] for ts in tensors]
    bias1 = 1 - beta1 ** step
    bias2_sqrt = (1 - beta2 ** step) ** 0.5  # as torch computes it (not math.sqrt)
    step_size = lr / bias1
    for batch in _batches(_tiles(params, tile), tile):
        p, g, m1, m2, *e = ([f[i][s:end] for i, s, end in batch] for f in flat)
        if weight_decay != 0:
            torch._foreach_mul_(p, 1 - lr * weight_decay)
        torch._foreach_lerp_(m1, g, 1 - beta1)
        torch._foreach_mul_(m2, beta2)
        torch._foreach_addcmul_(m2, g, g, 1 - beta2)
        denom = torch._foreach_sqrt(m2)
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(p, m1, denom, -step_size)
        if e:
            torch._foreach_mul_(e[0], momentum)
            torch._foreach_add_(e[0], p, alpha=1.0 - momentum)
