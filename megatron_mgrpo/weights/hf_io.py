"""Read HF checkpoints (safetensors, single file or sharded with an index) lazily, by name.

`HFCheckpoint(dir)` is a read-only mapping from tensor names to tensors that opens each shard
with `safetensors.safe_open` and reads a tensor only when it is asked for, so converting a big
model tensor by tensor never holds the whole model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Dict, Iterator

import torch

from megatron_mgrpo.config.schema import ConfigError

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


class HFCheckpoint(Mapping):
    """Lazy name -> tensor view of an HF model directory's safetensors."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, _INDEX)
        single = os.path.join(directory, _SINGLE)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(single):
            from safetensors import safe_open

            with safe_open(single, framework="pt") as f:
                weight_map = {k: _SINGLE for k in f.keys()}
        else:
            raise ConfigError(f"model.load: no {_SINGLE} or {_INDEX} in {directory!r}")
        missing = sorted({s for s in weight_map.values()
                          if not os.path.isfile(os.path.join(directory, s))})
        if missing:
            raise ConfigError(f"model.load: shard(s) {', '.join(missing)} listed in {directory!r} "
                              "are missing")
        self._where: Dict[str, str] = weight_map
        self._handles: Dict[str, object] = {}

    def _handle(self, shard: str):
        from safetensors import safe_open

        if shard not in self._handles:
            self._handles[shard] = safe_open(os.path.join(self.directory, shard), framework="pt")
        return self._handles[shard]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._handle(self._where[name]).get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def load_hf_into_policy(policy, directory: str) -> None:
    """Initialise a MegatronPolicy from an HF model directory (every rank reads its tensors)."""
    from megatron_mgrpo.weights.hf_map import hf_to_megatron

    hf = HFCheckpoint(directory)
    full = {}
    for name, tensor in hf_to_megatron(hf, policy.model_cfg):
        full[name] = tensor.float()
    policy.load_full_state_dict(full)
