"""The momentum model: an fp32 EMA of the policy, sharded like the optimizer state (Eq. 1).

theta_k <- m * theta_k + (1 - m) * theta_q, once per training step (every `interval`-th), fused
into that step's last optimizer update (`AdamEMA`). The EMA tracks the optimizer's fp32 *main*
params, so each rank keeps exactly what its optimizer holds:

- megatron's distributed optimizer: this data-parallel rank's shard of each parameter (the
  range megatron assigns it), so the EMA costs 4 / DP bytes per parameter, like each Adam moment;
- the plain optimizer: the whole of this rank's TP shard of each parameter of its PP stage.

`full_tensor(param)` materialises one parameter's EMA (this rank's TP shard of it, all of it)
in any dtype, gathering the shards over data-parallel ranks: the weight push and the checkpoint
export ask for one parameter at a time, so no rank ever holds the momentum model in fp32.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_mgrpo.algorithm import check_momentum
from megatron_mgrpo.optim.adam_ema import AdamEMA
from megatron_mgrpo.weights.megatron_layout import named_global_parameters


@dataclass(frozen=True)
class MomentumSchedule:
    """When the EMA moves and with which coefficient."""

    momentum: float = 0.99
    """m once warmed up."""
    interval: int = 1
    """Update every this many training steps."""
    warmup_updates: int = 0
    """Over the first this many updates m rises linearly from `warmup_start` to `momentum`."""
    warmup_start: float = 0.0
    """m of the first update when warming up."""

    def __post_init__(self):
        check_momentum(self.momentum)
        check_momentum(self.warmup_start)
        if self.interval < 1 or self.warmup_updates < 0:
            raise ValueError(f"interval must be >= 1 and warmup_updates >= 0, got "
                             f"{self.interval}, {self.warmup_updates}")

    @classmethod
    def from_config(cls, a) -> "MomentumSchedule":
        """From the `algorithm` section of the config."""
        return cls(a.momentum, a.momentum_update_interval, a.momentum_warmup_updates,
                   a.momentum_warmup_start)

    def coefficient(self, updates_done: int) -> float:
        """m for the update after `updates_done` earlier ones."""
        if updates_done >= self.warmup_updates:
            return self.momentum
        frac = updates_done / self.warmup_updates
        return self.warmup_start + (self.momentum - self.warmup_start) * frac


@dataclass
class _Entry:
    """One model parameter: the optimizer's main copy of (a range of) it, and its EMA."""

    param: torch.nn.Parameter
    """The model parameter (this rank's TP shard, its PP stage)."""
    main: Optional[torch.Tensor]
    """The optimizer's fp32 main param for it: the whole of it, or this DP rank's range of it
    flattened (None: another DP rank owns all of it)."""
    start: int
    """Range of `param.view(-1)` that `main` holds."""
    end: int
    ema: Optional[torch.Tensor]
    """fp32, `main`'s shape."""
    dp_group: Optional[Any]
    """The distributed optimizer's data-parallel group (None: not sharded)."""


class ShardedMomentum:
    """The momentum model of `policy`, kept inside its optimizer (see the module docstring).

    Builds the EMA from the optimizer's current main params: construct it after the policy's
    weights are loaded. Replaces each megatron optimizer's inner AdamW by an `AdamEMA` (same
    math and state).
    """

    def __init__(self, policy, schedule: MomentumSchedule):
        self.schedule = schedule
        self.updates = 0
        self.entries: Dict[int, _Entry] = {}
        self._adams: List[AdamEMA] = []
        for opt in getattr(policy.optimizer, "chained_optimizers", [policy.optimizer]):
            adam = _swap_in_adam_ema(opt)
            self._adams.append(adam)
            for entry in _entries(opt):
                if entry.main is not None:
                    entry.ema = entry.main.detach().float().clone()
                    adam.attach_ema([(entry.main, entry.ema)])
                self.entries[id(entry.param)] = entry
        missing = [n for n, p in named_global_parameters(policy.chunks)
                   if id(p) not in self.entries]
        if missing:
            raise RuntimeError(f"momentum model: parameter {missing[0]} is not in the optimizer")

    # ---- the update ------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        return step % self.schedule.interval == 0

    @contextlib.contextmanager
    def fused_into_next_step(self, step: int) -> Iterator[None]:
        """Around the optimizer step that should also move the EMA (if training step `step` is
        an update step): arms every AdamEMA for one step and checks that it happened."""
        if not self.due(step):
            yield
            return
        m = self.schedule.coefficient(self.updates)
        for adam in self._adams:
            adam.ema_momentum = m
        try:
            yield
        finally:
            done = [a.ema_updated and a.ema_momentum is None for a in self._adams]
            for adam in self._adams:
                adam.ema_momentum = None
        if not all(done):
            raise RuntimeError("momentum model: the optimizer step did not run")
        self.updates += 1

    # ---- reading it ------------------------------------------------------------------------

    def nbytes(self) -> int:
        """Bytes of EMA storage on this rank."""
        return sum(e.ema.numel() * 4 for e in self.entries.values() if e.ema is not None)

    def full_tensor(self, param: torch.nn.Parameter, dtype: torch.dtype = torch.float32
                    ) -> torch.Tensor:
        """The EMA of `param` (param's shape, `dtype`). Collective over the data-parallel group
        when the EMA is sharded: every DP rank calls it for the same params in the same order."""
        e = self.entries[id(param)]
        if e.dp_group is None:
            return e.ema.view(param.shape).to(dtype)
        flat = torch.zeros(param.numel(), dtype=dtype, device=param.device)
        if e.ema is not None:
            flat[e.start:e.end].copy_(e.ema)
        # The DP ranks' ranges are disjoint and cover the parameter: the sum is a gather.
        dist.all_reduce(flat, group=e.dp_group)
        return flat.view(param.shape)

    @contextlib.contextmanager
    def swapped_in(self, params: List[torch.nn.Parameter]) -> Iterator[None]:
        """Inside: the model params hold the momentum model's weights (cast to their dtype);
        after: the policy's again, bit for bit. For a forward of the momentum model through
        the policy's own modules (the KL to the momentum model): a transient copy of this
        rank's weights instead of a persistent one. Collective over DP when sharded: every
        rank passes the same params in the same order."""
        saved = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                for p in params:
                    p.copy_(self.full_tensor(p, p.dtype))
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)

    def max_gap(self) -> float:
        """max |EMA - policy| over the whole model (the policy's fp32 main params). Collective
        over all ranks."""
        gap = max((float((e.ema - e.main.detach()).abs().max()) for e in self.entries.values()
                   if e.ema is not None and e.ema.numel()), default=0.0)
        if dist.is_initialized() and dist.get_world_size() > 1:
            device = next(iter(self.entries.values())).param.device
            t = torch.tensor([gap], dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            gap = float(t)
        return gap

    @property
    def collective(self) -> bool:
        """Whether `full_tensor` needs every data-parallel rank."""
        return any(e.dp_group is not None for e in self.entries.values())

    # ---- checkpointing ---------------------------------------------------------------------

    def sharded_state_dict(self, params: Dict[str, Tuple[Any, torch.nn.Parameter]],
                           is_loading: bool, prefix: str = "momentum.") -> Dict[str, Any]:
        """The EMA as megatron sharded tensors keyed like the model's (`params`: sharded-state
        key -> (the model's sharded entry, its parameter)), in model space, so it reloads at
        any DP (and TP/PP) size. A sharded EMA is gathered per parameter for the save, as
        megatron-core 0.16 gathers the distributed optimizer's Adam state ("fully_reshardable";
        it no longer stores flattened ranges). Collective over DP when saving."""
        out = {}
        for key, (sh, param) in params.items():
            if is_loading:
                data = torch.empty(param.shape, dtype=torch.float32, device=param.device)
            else:
                data = self.full_tensor(param, torch.float32)
            kw = dict(key=prefix + sh.key, data=data)
            if hasattr(sh, "dtype"):
                kw["dtype"] = torch.float32
            out[key] = dataclasses.replace(sh, **kw)
        return out

    def load_sharded(self, loaded: Dict[str, torch.Tensor],
                     params: Dict[str, Tuple[Any, torch.nn.Parameter]]) -> None:
        """Keep this rank's part of each loaded (model-space) EMA tensor."""
        for key, (_, param) in params.items():
            e = self.entries[id(param)]
            if e.ema is not None:
                e.ema.copy_(loaded[key].reshape(-1)[e.start:e.end].view(e.ema.shape))

    def state(self) -> Dict[str, int]:
        return {"updates": self.updates}

    def load_state(self, state: Dict[str, int]) -> None:
        self.updates = int(state.get("updates", 0))


def _swap_in_adam_ema(opt) -> AdamEMA:
    """Replace megatron optimizer `opt`'s inner AdamW by an AdamEMA over its groups and state."""
    inner = opt.optimizer
    if isinstance(inner, AdamEMA):
        return inner
    adam = AdamEMA.replacing(inner)
    opt.optimizer = adam
    return adam


def _entries(opt) -> Iterator[_Entry]:
    """(model param, main param, range) for every parameter megatron optimizer `opt` updates."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import (Float16OptimizerWithFloat16Params,
                                                   FP32Optimizer)

    if isinstance(opt, DistributedOptimizer):
        # Every param of the grad buffers: those wholly in other DP ranks' parts have no EMA
        # here, but their gathers still need this rank.
        for buffer in opt.buffers:
            for param in buffer.param_index_map:
                yield _dist_entry(opt, param)
    elif isinstance(opt, Float16OptimizerWithFloat16Params):
        for model_group, main_group in zip(opt.float16_groups, opt.fp32_from_float16_groups):
            for param, main in zip(model_group, main_group):
                yield _Entry(param, main, 0, param.numel(), None, None)
        for group in opt.fp32_from_fp32_groups:
            for param in group:
                yield _Entry(param, param, 0, param.numel(), None, None)
    elif isinstance(opt, FP32Optimizer):
        for group in opt.optimizer.param_groups:
            for param in group["params"]:
                yield _Entry(param, param, 0, param.numel(), None, None)
    else:
        raise TypeError(f"momentum model: unsupported optimizer {type(opt).__name__}")


def _dist_entry(opt, param) -> _Entry:
    if param not in opt.model_param_group_index_map:
        return _Entry(param, None, 0, 0, None, opt.data_parallel_group)
    group_index, group_order = opt.model_param_group_index_map[param]
    main = opt.optimizer.param_groups[group_index]["params"][group_order]
    r = opt._get_model_param_range_map(param)["param"]
    return _Entry(param, main, r.start, r.end, None, opt.data_parallel_group)
