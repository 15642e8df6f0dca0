"""Read HF checkpoints (safetensors, single file or sharded with an index) lazily, by name.

`HFCheckpoint(dir)` is a read-only mapping from tensor names to tensors. Opening it reads only
the shards' headers (so names, shapes and dtypes can be checked before any data is touched); a
tensor is read from disk when it is asked for, into memory of its own size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Dict, Iterator, Tuple

import torch

from megatron_mgrpo.config.schema import ConfigError
from megatron_mgrpo.weights.safetensors_io import DTYPES, SafetensorsError, read_header, read_tensor

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
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise ConfigError(f"model.load: {index} is not a safetensors index "
                                      f"({e})") from None
            shards = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            weight_map, shards = None, [_SINGLE]
        else:
            raise ConfigError(f"model.load: no {_SINGLE} or {_INDEX} in {directory!r}")
        missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
        if missing:
            raise ConfigError(f"model.load: shard(s) {', '.join(missing)} listed in {directory!r} "
                              "are missing")
        self._entries: Dict[str, Tuple[str, dict, int]] = {}
        for shard in shards:
            path = os.path.join(directory, shard)
            try:
                header, start = read_header(path)
            except SafetensorsError as e:
                raise ConfigError(f"model.load: {e}") from None
            for name, entry in header.items():
                if weight_map is None or weight_map.get(name) == shard:
                    self._entries[name] = (path, entry, start)
        absent = sorted(n for n, s in (weight_map or {}).items() if n not in self._entries)
        if absent:
            raise ConfigError(f"model.load: {len(absent)} tensor(s) of the index are not in "
                              f"their shard (first: {absent[0]!r} in {weight_map[absent[0]]})")
        self._files: Dict[str, object] = {}

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._entries[name][1]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self._entries[name][1]["dtype"]
        if code not in DTYPES:
            raise ConfigError(f"model.load: {name} has dtype {code}, which is not supported")
        return DTYPES[code]

    def nbytes(self, name: str) -> int:
        begin, end = self._entries[name][1]["data_offsets"]
        return end - begin

    def __getitem__(self, name: str) -> torch.Tensor:
        path, entry, start = self._entries[name]
        if path not in self._files:
            self._files[path] = open(path, "rb")
        return read_tensor(self._files[path], entry, start)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def load_hf_into_policy(policy, directory: str) -> None:
    """Initialise a MegatronPolicy from an HF model directory. Each rank reads only the tensors
    of its pipeline stage, one at a time, and keeps its TP shard of each."""
    from megatron_mgrpo.weights.hf_map import hf_to_megatron
    from megatron_mgrpo.weights.megatron_layout import load_full_tensors, stage_targets

    hf = HFCheckpoint(directory)
    model = policy.chunks
    try:
        load_full_tensors(model, hf_to_megatron(hf, policy.model_cfg, names=stage_targets(model)),
                          policy.ctx.tp_rank, policy.ctx.tp_size)
    finally:
        hf.close()
    policy.weights_changed()
