"""The live weight push: Megatron policy (or its momentum EMA) -> the rollout engine, in buckets.

Each pipeline stage gathers its parameters over TP (`iter_full_tensors`), converts them to HF
names and layout with the same map the conversion tools use (`megatron_to_hf_tensors`), and
streams them in size-bounded buckets into `engine.update_weights`.

Placement (the embedded engine): the engine lives in global rank 0's process, which is TP rank
0, DP rank 0 of the first stage. Per stage only TP rank 0 / DP rank 0 sends; its TP peers take
part in the gathers and drop the result; DP ranks > 0 hold the same weights and do nothing.
Stage 0's buckets go straight into the engine; every later stage's sender ships its buckets to
rank 0 point to point over the pipeline group (a small metadata object, then one flat byte
buffer), stage after stage, so no process ever holds more than one bucket in flight.
If the engine rejects the update, rank 0 still drains every stage (so no sender is left
blocked), and all ranks raise the same error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_mgrpo.rollout.base import Bucket, check_weight_set
from megatron_mgrpo.weights.hf_map import megatron_to_hf_tensors
from megatron_mgrpo.weights.megatron_layout import iter_full_tensors

DEFAULT_BUCKET_BYTES = 512 * 2 ** 20
_ALIGN = 16  # byte alignment of each tensor inside a flat transfer buffer


@dataclass
class PushStats:
    """What one push moved. Rank 0: the whole model; a later stage's sender: its stage;
    other ranks: zeros."""

    bytes: int = 0
    """Bytes of tensor data."""
    tensors: int = 0
    """HF tensors."""
    buckets: int = 0
    """Buckets."""
    seconds: float = 0.0
    """Wall time of the push on this rank (rank 0: until the engine holds the new version)."""

    def add(self, bucket: Bucket) -> None:
        self.buckets += 1
        self.tensors += len(bucket)
        self.bytes += sum(t.numel() * t.element_size() for _, t in bucket)


def iter_hf_tensors(policy, tensor_of: Optional[Callable] = None,
                    dtype: Optional[torch.dtype] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for this pipeline stage's parameters, TP-gathered.

    Collective over the TP group (every TP rank iterates in step). `tensor_of(param)` picks
    what is gathered (default the weights; `momentum_tensor_of` for the EMA); `dtype` casts.
    The tensors may be views of live parameters: consume them before the next optimizer step.
    """
    ctx, cfg = policy.ctx, policy.model_cfg
    for name, full in iter_full_tensors(policy.chunks, ctx.tp_group, ctx.tp_size,
                                        cfg.vocab_size, tensor_of or (lambda p: p.data)):
        for hf_name, t in megatron_to_hf_tensors(name, full, cfg):
            yield hf_name, (t if dtype is None else t.to(dtype))


def momentum_tensor_of(momentum, dtype: Optional[torch.dtype] = None) -> Callable:
    """`tensor_of` for the momentum model: each parameter's EMA, gathered over DP ranks when it
    is sharded, cast before the gather (bf16 halves the traffic)."""
    return lambda p: momentum.full_tensor(p, dtype or torch.float32)


def _tensor_bytes(item: Tuple[str, torch.Tensor]) -> int:
    return item[1].numel() * item[1].element_size()


def bucketize(items: Iterable, bucket_bytes: int, nbytes: Callable[[Any], int] = _tensor_bytes
              ) -> Iterator[list]:
    """Group items (by default (name, tensor) pairs; `nbytes` sizes any other kind), in order,
    into buckets of at most `bucket_bytes` bytes; an item larger than that goes alone."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes: got {bucket_bytes}; accepted: an integer >= 1")
    bucket: list = []
    size = 0
    for item in items:
        n = nbytes(item)
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append(item)
        size += n
    if bucket:
        yield bucket


def push_weights(engine, policy, model: str = "policy", version: int = 0,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, momentum=None,
                 dtype: Optional[torch.dtype] = None,
                 fp8_block_size: Optional[int] = None) -> PushStats:
    """Push the policy's weights (model="policy") or the momentum EMA (model="momentum",
    with `momentum` a ShardedMomentum) into weight set `model` of `engine`, stamped `version`.

    Collective: every rank calls it; `engine` is the engine on global rank 0 and None
    elsewhere. `dtype` casts before transfer (e.g. the engine's dtype, to halve PP traffic).
    `fp8_block_size` (not None) sends the layers' linear weights in FP8 with their scales
    (`weights.fp8`; 0: one scale per tensor), each stage quantising its own.
    """
    check_weight_set(model)
    if model == "momentum" and momentum is None:
        raise ValueError("push_weights(model='momentum') needs the momentum model (momentum=...)")
    ctx = policy.ctx
    if ctx.rank == 0 and engine is None:
        raise ValueError("push_weights: global rank 0 holds the engine and must pass it")
    tensor_of = momentum_tensor_of(momentum, dtype) if model == "momentum" else None
    t0 = time.perf_counter()
    stats = PushStats()
    error: Optional[BaseException] = None

    if ctx.dp_rank == 0:
        local = iter_hf_tensors(policy, tensor_of, dtype)
        if ctx.rank == 0:
            error = _feed_engine(engine, model, version, _all_stages(
                ctx, _buckets(local, bucket_bytes, fp8_block_size), stats))
        elif ctx.tp_rank == 0:
            dst = dist.get_global_rank(ctx.pp_group, 0)
            if dst != 0:
                raise RuntimeError(f"push_weights: stage 0's sender is rank {dst}, not the "
                                   "engine's rank 0 (unexpected rank order)")
            for bucket in _buckets(local, bucket_bytes, fp8_block_size):
                _send_bucket(bucket, dst, ctx)
                stats.add(bucket)
            _send_bucket(None, dst, ctx)
        else:
            for _ in local:  # TP peers: take part in the gathers
                pass
    elif tensor_of is not None and momentum.collective:
        for _ in iter_hf_tensors(policy, tensor_of, dtype):  # the EMA's DP gathers need us too
            pass

    if ctx.world_size > 1:  # every rank learns whether the engine took the update
        status = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(status, src=0)
        if error is None and status[0] is not None:
            raise RuntimeError(f"weight push of {model!r} failed on rank 0: {status[0]}")
    if error is not None:
        raise error
    stats.seconds = time.perf_counter() - t0
    return stats


def _buckets(local: Iterator[Tuple[str, torch.Tensor]], bucket_bytes: int,
             fp8_block_size: Optional[int]) -> Iterator[Bucket]:
    """This stage's buckets; in FP8, a weight and its scale always share one."""
    if fp8_block_size is None:
        yield from bucketize(local, bucket_bytes)
        return
    from megatron_mgrpo.weights.fp8 import quantize_stream

    for groups in bucketize(quantize_stream(local, fp8_block_size), bucket_bytes,
                            lambda group: sum(map(_tensor_bytes, group))):
        yield [item for group in groups for item in group]


def _all_stages(ctx, buckets: Iterator[Bucket], stats: PushStats) -> Iterator[Bucket]:
    """Rank 0's stream: its own stage's buckets, then each later stage's, received in turn."""
    for bucket in buckets:
        stats.add(bucket)
        yield bucket
    for stage in range(1, ctx.pp_size):
        src = dist.get_global_rank(ctx.pp_group, stage)
        while (bucket := _recv_bucket(src, ctx)) is not None:
            stats.add(bucket)
            yield bucket


def _feed_engine(engine, model: str, version: int, buckets: Iterator[Bucket]
                 ) -> Optional[BaseException]:
    """engine.update_weights over the stream; on failure drain the rest of the stream (so TP
    peers and later stages finish their part) and return the error."""
    try:
        engine.update_weights(model, buckets, version)
        return None
    except Exception as e:  # noqa: BLE001 - handed to every rank, then re-raised
        for _ in buckets:
            pass
        return e


def _layout(meta) -> Tuple[List[int], List[int], int]:
    """Byte sizes and aligned offsets of a bucket's tensors in its flat buffer, and its size."""
    sizes = [torch.Size(shape).numel() * dt.itemsize for _, shape, dt in meta]
    offsets, end = [], 0
    for n in sizes:
        offsets.append(end)
        end += -(-n // _ALIGN) * _ALIGN
    return sizes, offsets, end


def _send_bucket(bucket: Optional[Bucket], dst: int, ctx) -> None:
    """Metadata (names, shapes, dtypes; None ends the stage), then one flat byte buffer."""
    if bucket is None:
        dist.send_object_list([None], dst=dst, group=ctx.pp_group, device=_obj_device(ctx))
        return
    meta = [(name, tuple(t.shape), t.dtype) for name, t in bucket]
    sizes, offsets, total = _layout(meta)
    dist.send_object_list([meta], dst=dst, group=ctx.pp_group, device=_obj_device(ctx))
    flat = torch.empty(total, dtype=torch.uint8, device=ctx.device)
    for (_, t), off, n in zip(bucket, offsets, sizes):
        flat[off:off + n].view(t.dtype).view(t.shape).copy_(t)
    dist.send(flat, dst=dst, group=ctx.pp_group)


def _recv_bucket(src: int, ctx) -> Optional[Bucket]:
    holder = [None]
    dist.recv_object_list(holder, src=src, group=ctx.pp_group, device=_obj_device(ctx))
    meta = holder[0]
    if meta is None:
        return None
    sizes, offsets, total = _layout(meta)
    flat = torch.empty(total, dtype=torch.uint8, device=ctx.device)
    dist.recv(flat, src=src, group=ctx.pp_group)
    return [(name, flat[off:off + n].view(dt).view(shape))
            for (name, shape, dt), off, n in zip(meta, offsets, sizes)]


def _obj_device(ctx) -> Optional[torch.device]:
    return ctx.device if ctx.device.type == "cuda" else None
