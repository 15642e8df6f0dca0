"""Megatron's parallel layout: between full tensors (TP=1, PP=1 names) and this rank's shards.

A *full* state dict uses the names of the unsplit model (`decoder.layers.{global index}...`) and
the real vocabulary size (no padding rows). A rank's *local* parameters are TP shards of those
tensors, for the layers of its pipeline stage: one GPTModel, or with a virtual pipeline a list
of model chunks, each with its own layer offset (functions here take either). Megatron marks
every split parameter with `partition_dim` and `partition_stride`; a stride of 2 (the fused
SwiGLU gate/up weight) means the tensor is made of 2 blocks, each split over TP separately.

These functions serve the tests, checkpoint conversion and the weight push; the full dict of a
big model never needs to exist at once: `shard_tensor` / `unshard_tensor` work tensor by tensor.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EMBED = "embedding.word_embeddings.weight"
_OUTPUT = "output_layer.weight"


def model_chunks(model) -> List[torch.nn.Module]:
    """This rank's model chunks: `model` itself, or the list it already is."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def layer_offset(model) -> int:
    """Global index of this model chunk's first transformer layer."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    return get_transformer_layer_offset(model.config, getattr(model, "vp_stage", None))


def named_global_parameters(model) -> Iterator[Tuple[str, torch.nn.Parameter]]:
    """(full name, parameter) over this rank's chunks, layers renamed to their global index.
    The tied output layer of the last stage keeps its own name."""
    for chunk in model_chunks(model):
        offset = layer_offset(chunk)
        for local, param in chunk.named_parameters():
            yield to_global_name(local, offset), param


def _tied(model) -> bool:
    return model_chunks(model)[0].share_embeddings_and_output_weights


def to_global_name(local: str, offset: int) -> str:
    return _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", local)


def to_local_name(full: str, offset: int) -> str:
    return _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) - offset}.", full)


def _split_info(param) -> Tuple[Optional[int], int]:
    if not getattr(param, "tensor_model_parallel", False):
        return None, 1
    return param.partition_dim, getattr(param, "partition_stride", 1)


def shard_tensor(full: torch.Tensor, tp_rank: int, tp_size: int, dim: Optional[int],
                 stride: int = 1) -> torch.Tensor:
    """This TP rank's shard of `full` (split along `dim` in `stride` blocks)."""
    if dim is None or tp_size == 1:
        return full
    blocks = full.chunk(stride, dim=dim)
    return torch.cat([b.chunk(tp_size, dim=dim)[tp_rank] for b in blocks], dim=dim)


def unshard_tensor(shards: List[torch.Tensor], dim: Optional[int], stride: int = 1
                   ) -> torch.Tensor:
    """Inverse of shard_tensor: the full tensor from all TP ranks' shards, in rank order."""
    if dim is None or len(shards) == 1:
        return shards[0]
    per_rank = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([torch.cat([r[b] for r in per_rank], dim=dim) for b in range(stride)],
                     dim=dim)


def _is_vocab(name: str) -> bool:
    return name in (_EMBED, _OUTPUT)


def stage_targets(model) -> Dict[str, List[torch.nn.Parameter]]:
    """Full tensor name -> this rank's parameters that take a shard of it (the tied output
    layer of a last pipeline stage reads the embedding)."""
    tied = _tied(model)
    out: Dict[str, List[torch.nn.Parameter]] = {}
    for name, param in named_global_parameters(model):
        if name == _OUTPUT and tied:
            name = _EMBED
        out.setdefault(name, []).append(param)
    return out


@torch.no_grad()
def _copy_shard(param, name: str, src: torch.Tensor, tp_rank: int, tp_size: int) -> None:
    dim, stride = _split_info(param)
    if _is_vocab(name):
        padded_rows = param.shape[0] * (tp_size if dim == 0 else 1)
        if src.shape[0] > padded_rows:
            raise ValueError(f"{name}: {src.shape[0]} rows, more than the model's {padded_rows}")
        if src.shape[0] < padded_rows:
            src = torch.cat([src, src.new_zeros(padded_rows - src.shape[0], *src.shape[1:])])
    shard = shard_tensor(src, tp_rank, tp_size, dim, stride)
    if shard.shape != param.shape:
        raise ValueError(f"{name}: shard shape {tuple(shard.shape)} does not match the "
                         f"parameter's {tuple(param.shape)} (tp_rank {tp_rank}/{tp_size})")
    param.copy_(shard.to(param.dtype))


def load_full_tensors(model, tensors: Iterable[Tuple[str, torch.Tensor]], tp_rank: int,
                      tp_size: int, strict: bool = True) -> None:
    """Copy a stream of full tensors into this rank's (TP-sharded, PP-staged) parameters in
    place, one at a time; names this stage does not hold are skipped. Vocabulary tensors hold
    the real vocabulary; padding rows are zero-filled."""
    targets = stage_targets(model)
    done = set()
    for name, src in tensors:
        for param in targets.get(name, ()):
            _copy_shard(param, name, src, tp_rank, tp_size)
            done.add(name)
    missing = sorted(set(targets) - done)
    if strict and missing:
        raise KeyError(f"no tensor for {', '.join(missing)}")


def load_full_state_dict(model, full: Dict[str, torch.Tensor], tp_rank: int, tp_size: int,
                         strict: bool = True) -> None:
    """`load_full_tensors` from a dict of full tensors."""
    load_full_tensors(model, ((n, full[n]) for n in stage_targets(model) if n in full),
                      tp_rank, tp_size, strict)


def iter_full_tensors(model, tp_group, tp_size: int, real_vocab_size: int,
                      tensor_of: Callable = lambda p: p.data,
                      ) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield (full name, full tensor) for this pipeline stage's parameters, TP-gathered.

    Collective over the TP group: every TP rank must iterate in step. `tensor_of` picks what
    is gathered (the weight by default; `lambda p: p.main_grad` for gradients). The tied
    output layer of a last stage is skipped (it is the embedding).
    """
    tied = _tied(model)
    for name, param in named_global_parameters(model):
        if name == _OUTPUT and tied:
            continue
        t = tensor_of(param).detach()
        dim, stride = _split_info(param)
        if dim is not None and tp_size > 1:
            shards = [torch.empty_like(t) for _ in range(tp_size)]
            dist.all_gather(shards, t.contiguous(), group=tp_group)
            t = unshard_tensor(shards, dim, stride)
        if _is_vocab(name):
            t = t[:real_vocab_size]
        yield name, t


def gather_full_state_dict(model, ctx, real_vocab_size: int,
                           tensor_of: Callable = lambda p: p.data) -> Dict[str, torch.Tensor]:
    """The full state dict on every rank (TP all-gather, then PP exchange of stages).

    Holds the whole model in memory: for tests, checks and small models. Streaming consumers
    (weight push, export) use `iter_full_tensors` stage by stage instead.
    """
    local = {n: t.cpu().clone() for n, t in
             iter_full_tensors(model, ctx.tp_group, ctx.tp_size, real_vocab_size, tensor_of)}
    if ctx.pp_size == 1:
        return local
    stages: List[Optional[Dict[str, torch.Tensor]]] = [None] * ctx.pp_size
    dist.all_gather_object(stages, local, group=ctx.pp_group)
    out: Dict[str, torch.Tensor] = {}
    for stage in stages:
        out.update(stage)
    return out
