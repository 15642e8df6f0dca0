"""Model weights as a megatron-core distributed checkpoint, written and read tensor by tensor.

A dist_checkpointing (`torch_dist`) checkpoint stores every tensor under a layout-free key with
its global shape: the tensors of all transformer layers are stacked on a leading axis
(`decoder.layers.mlp.linear_fc2.weight` is [layers, hidden, ffn]); TP splits are chunks of the
global tensor. So the *global* tensor is the TP=1 tensor, and a checkpoint written here loads
into a `GPTModel` at any TP/PP through `dist_checkpointing.load` (which reads each rank's
overlap with the stored chunks). Two details follow megatron's own `sharded_state_dict`:
- the local layer spec names its norms like the TE spec (`input_layernorm.weight` is stored as
  `self_attention.linear_qkv.layer_norm_weight`), so checkpoints move between the two specs;
- the vocabulary tensors may be stored unpadded (megatron loads them with
  `allow_shape_mismatch`, zero-filling the padding rows of the TP it runs at).

Writing goes through torch.distributed.checkpoint with a planner that describes every chunk up
front and reads its data only when the writer asks for it; each chunk goes to its own file,
because DCP keeps every tensor of a file alive until the file is closed. Reading plans the
reads of one layer's slice of one tensor at a time, the same way.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_mgrpo.weights.files import ConversionError, write_failure

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# Local-spec parameter -> the TE-spec name megatron stores it under.
_KEY_MAP = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
            "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
_KEY_UNMAP = {v: k for k, v in _KEY_MAP.items()}
# Full-name suffix -> (TP split dim, blocks split separately): megatron's parallel layers.
_SPLITS = {"linear_qkv.weight": (0, 1), "linear_qkv.bias": (0, 1), "linear_fc1.weight": (0, 2),
           "word_embeddings.weight": (0, 1), "output_layer.weight": (0, 1),
           "linear_proj.weight": (1, 1), "linear_fc2.weight": (1, 1)}
# What megatron writes beside the tensors (metadata.json): the backends that read them back.
_MCORE_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                   "common_backend": "torch", "common_backend_version": 1}
PREFIX_MOMENTUM = "momentum."


@contextlib.contextmanager
def _single_process():
    """DCP warns that it runs in one process when torch.distributed is not up: that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def checkpoint_key(full_name: str, prefix: str = "") -> Tuple[str, Optional[int]]:
    """(dist-checkpoint key, layer index or None) of a full Megatron tensor name."""
    m = _LAYER.match(full_name)
    if not m:
        return prefix + full_name, None
    rest = _KEY_MAP.get(m.group(2), m.group(2))
    return f"{prefix}decoder.layers.{rest}", int(m.group(1))


def full_name(key: str, layer: Optional[int], prefix: str = "") -> str:
    """Inverse of checkpoint_key."""
    key = key[len(prefix):]
    if layer is None:
        return key
    rest = key[len("decoder.layers."):]
    return f"decoder.layers.{layer}.{_KEY_UNMAP.get(rest, rest)}"


def tp_split(full_name: str) -> Tuple[Optional[int], int]:
    for suffix, split in _SPLITS.items():
        if full_name.endswith(suffix):
            return split
    return None, 1


def tp_chunks(name: str, shape: Sequence[int], tp: int
              ) -> List[Tuple[Tuple[int, ...], Tuple[int, ...]]]:
    """(offsets, sizes) of the chunks megatron would store for `name` when saved at `tp`."""
    dim, stride = tp_split(name)
    if dim is None or tp == 1:
        return [((0,) * len(shape), tuple(shape))]
    block = shape[dim] // stride
    per = math.ceil(block / tp)  # vocabulary rows need not divide: the last chunk is shorter
    out = []
    for r in range(tp):
        for b in range(stride):
            begin, end = b * block + r * per, b * block + min((r + 1) * per, block)
            if begin >= end:
                continue
            offsets = [0] * len(shape)
            sizes = list(shape)
            offsets[dim], sizes[dim] = begin, end - begin
            out.append((tuple(offsets), tuple(sizes)))
    return out


@dataclass
class _Chunk:
    name: str  # full Megatron name
    key: str
    global_shape: Tuple[int, ...]
    offsets: Tuple[int, ...]
    sizes: Tuple[int, ...]
    layer: Optional[int]


def _plan(shapes: Dict[str, Tuple[int, ...]], num_layers: int, tp: int, prefix: str
          ) -> List[_Chunk]:
    chunks = []
    for name, shape in shapes.items():
        key, layer = checkpoint_key(name, prefix)
        lead = () if layer is None else (num_layers,)
        for offsets, sizes in tp_chunks(name, shape, tp):
            chunks.append(_Chunk(name, key, lead + tuple(shape),
                                 (() if layer is None else (layer,)) + offsets,
                                 (() if layer is None else (1,)) + sizes, layer))
    return chunks


def write_dist_checkpoint(out_dir: str, shapes: Dict[str, Tuple[int, ...]], num_layers: int,
                          load: Callable[[str], torch.Tensor],
                          dtype: Union[torch.dtype, Dict[str, torch.dtype]], tp: int = 1,
                          prefix: str = "", progress: Optional[Callable[[str], None]] = None
                          ) -> Dict[str, int]:
    """Write full tensors (`load(name)` for each name of `shapes`, asked for once per chunk, in
    order) as a megatron-core dist checkpoint in `out_dir`, chunked as saved at `tp`, in `dtype`
    (one for all, or name -> dtype).

    Runs in one process without torch.distributed. Returns {"tensors", "chunks", "bytes"}.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex,
                                                       TensorProperties)
    from torch.distributed.checkpoint.planner import (SavePlan, TensorWriteData, WriteItem,
                                                      WriteItemType)

    dtypes = dtype if isinstance(dtype, dict) else {name: dtype for name in shapes}
    chunks = _plan(shapes, num_layers, tp, prefix)
    by_index = {(c.key, c.offsets): c for c in chunks}
    cache: Dict[str, torch.Tensor] = {}
    written = {"bytes": 0}

    class LazyPlanner(DefaultSavePlanner):
        def create_local_plan(self):
            self.plan = SavePlan([
                WriteItem(index=MetadataIndex(c.key, torch.Size(c.offsets)),
                          type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(
                              chunk=ChunkStorageMetadata(torch.Size(c.offsets),
                                                         torch.Size(c.sizes)),
                              properties=TensorProperties(dtype=dtypes[c.name]),
                              size=torch.Size(c.global_shape)))
                for c in chunks], planner_data={})
            return self.plan

        def resolve_data(self, write_item):
            c = by_index[(write_item.index.fqn, tuple(write_item.index.offset))]
            if c.name not in cache:
                cache.clear()  # chunks of one tensor come together: keep only the current one
                cache[c.name] = load(c.name)
                if progress is not None:
                    progress(c.name)
            full = cache[c.name]
            local = full
            lead = 0 if c.layer is None else 1
            for d, (o, s) in enumerate(zip(c.offsets[lead:], c.sizes[lead:])):
                local = local.narrow(d, o, s)
            # A fresh tensor: torch.save of a view would write the whole storage.
            out = torch.empty(local.shape, dtype=dtypes[c.name]).copy_(local).reshape(c.sizes)
            written["bytes"] += out.numel() * out.element_size()
            return out

    os.makedirs(out_dir, exist_ok=True)
    writer = dcp.FileSystemWriter(out_dir, single_file_per_rank=False, thread_count=1,
                                  sync_files=True)
    try:
        with _single_process():
            dcp.save({}, storage_writer=writer, planner=LazyPlanner(), no_dist=True)
        cache.clear()
        torch.save({}, os.path.join(out_dir, "common.pt"))
        with open(os.path.join(out_dir, "metadata.json"), "w") as f:
            json.dump(_MCORE_METADATA, f)
    except BaseException as e:
        raise write_failure(_unwrap(e), out_dir) from None
    return {"tensors": len(shapes), "chunks": len(chunks), "bytes": written["bytes"]}


def _unwrap(e: BaseException) -> BaseException:
    """torch.distributed.checkpoint reports a failure as a CheckpointException (a
    BaseException) wrapping each rank's exception: the one exception of this process."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(e, CheckpointException) and len(e.failures) == 1:
        return next(iter(e.failures.values()))[0]
    return e


def stored_tensors(ckpt_dir: str) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """Key -> (global shape, dtype) of every tensor in a dist checkpoint (metadata only)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(ckpt_dir).read_metadata()
    return {k: (tuple(v.size), v.properties.dtype) for k, v in meta.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


class DistCheckpointReader:
    """Full tensors out of a dist checkpoint, one at a time, by full Megatron name.

    Reads only the requested slice (one layer of a stacked tensor) through
    torch.distributed.checkpoint in this process; no process group is needed. `prefix` selects
    the momentum model of a training checkpoint ("momentum.").
    """

    def __init__(self, ckpt_dir: str, prefix: str = ""):
        if not os.path.isfile(os.path.join(ckpt_dir, "metadata.json")):
            raise FileNotFoundError(f"{ckpt_dir!r} is not a megatron-core dist checkpoint "
                                    "(no metadata.json)")
        self.ckpt_dir = ckpt_dir
        self.prefix = prefix
        self.stored = stored_tensors(ckpt_dir)

    def has(self, name: str) -> bool:
        return checkpoint_key(name, self.prefix)[0] in self.stored

    def read(self, name: str, rows: Optional[int] = None) -> torch.Tensor:
        """The full tensor `name` in its stored dtype; with `rows`, only its first rows (the
        vocabulary tensors' stored copy may carry TP padding)."""
        import torch.distributed.checkpoint as dcp

        key, layer = checkpoint_key(name, self.prefix)
        if key not in self.stored:
            raise KeyError(f"{self.ckpt_dir}: no tensor {key!r} (for {name})")
        shape, dtype = self.stored[key]
        inner = list(shape if layer is None else shape[1:])
        if rows is not None:
            if rows > inner[0]:
                raise ValueError(f"{key}: {rows} rows wanted, {inner[0]} stored")
            inner[0] = rows
        offsets = (0,) * len(inner) if layer is None else (layer,) + (0,) * len(inner)
        sizes = tuple(inner) if layer is None else (1,) + tuple(inner)
        target = torch.empty(sizes, dtype=dtype)
        try:
            with _single_process():
                dcp.load({}, checkpoint_id=self.ckpt_dir, no_dist=True,
                         planner=_SlicePlanner(key, offsets, target))
        except BaseException as e:
            cause = _unwrap(e)
            if isinstance(cause, (OSError, KeyboardInterrupt)):
                raise cause from None
            raise ConversionError(f"{self.ckpt_dir}: cannot read {key} ({type(cause).__name__}: "
                                  f"{cause}): a damaged checkpoint?") from None
        return target if layer is None else target[0]


class _SlicePlanner(DefaultLoadPlanner):
    """Reads the chunk of `key` at `offsets` into `target`. A module-level class on purpose: one
    defined inside `read` would sit in a reference cycle with `target`, keeping every tensor read
    alive until the next GC pass."""

    def __init__(self, key: str, offsets: Tuple[int, ...], target: torch.Tensor):
        super().__init__()
        self.key, self.offsets, self.target = key, offsets, target

    def create_local_plan(self):
        chunk = ChunkStorageMetadata(torch.Size(self.offsets), torch.Size(self.target.shape))
        return LoadPlan(create_read_items_for_chunk_list(
            self.key, self.metadata.state_dict_metadata[self.key], [chunk]))

    def lookup_tensor(self, index):
        return self.target
