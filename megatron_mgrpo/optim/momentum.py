"""The momentum model: an fp32 EMA of this rank's policy parameters (Eq. 1).

theta_k <- m * theta_k + (1 - m) * theta_q after every `interval`-th optimizer step. Each rank
keeps the EMA of exactly the parameter shards it holds (its TP shard of its PP stage), so the
momentum model is laid out like the policy: `tensor_of(param)` stands in for `param.data`
wherever full tensors are gathered (weight push, export). The sharded, optimizer-fused version
(EMA of the distributed optimizer's main-param shard) replaces the storage, not this interface.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from megatron_mgrpo.algorithm import check_momentum, ema_update_


class MomentumModel:
    """fp32 EMA of a list of parameters, initialised from them."""

    def __init__(self, params: List[torch.nn.Parameter], momentum: float, interval: int = 1):
        check_momentum(momentum)
        self.params = list(params)
        self.momentum = momentum
        self.interval = interval
        self.ema = [p.detach().float().clone() for p in self.params]
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self.updates = 0

    @torch.no_grad()
    def step(self, optimizer_step: int) -> bool:
        """Fold the current policy into the EMA if `optimizer_step` is an update step."""
        if optimizer_step % self.interval:
            return False
        ema_update_(self.ema, [p.detach() for p in self.params], self.momentum)
        self.updates += 1
        return True

    def tensor_of(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The EMA tensor standing for `param` (same shape, fp32)."""
        return self.ema[self._index[id(param)]]

    def state_dict(self) -> Dict[str, object]:
        return {"ema": [e.clone() for e in self.ema], "updates": self.updates}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        for dst, src in zip(self.ema, state["ema"]):
            dst.copy_(src)
        self.updates = int(state["updates"])
