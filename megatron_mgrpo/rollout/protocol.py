"""SGLang's HTTP protocol, both ends: request bodies, response parsing, tensor payloads.

One module for the wire format so that the client (`sglang_engine`) and the embedded server
(`server`) cannot drift apart, and so that a test can check every body we send against
SGLang's own request dataclasses (`sglang.srt.managers.io_struct`) where SGLang is installed.

- `/generate`: a batch of token-id prompts, one completion per item (n = 1) with its own
  `sampling_seed`, so that SGLang's prompt-major expansion of n never matters and each
  completion draws from the same random stream as in the embedded engine (`stream_seeds`).
  Log-probs come back as `meta_info.output_token_logprobs` = [[logprob, token_id, text], ...].
- Weight versions are strings on the wire: `policy:12`; a set whose update is under way
  reads `policy:12:partial` until the update is confirmed, so a server whose update broke
  off never claims a version it does not hold.
- `/update_weights_from_tensor`: `serialized_named_tensors` is one string per tensor-parallel
  rank, each base64 of a `ForkingPickler` dump of [(name, tensor), ...], the format of SGLang's
  `MultiprocessingSerializer`: CUDA tensors travel as IPC handles, CPU tensors as shared-memory
  file names; the bytes themselves never cross the HTTP connection.
- `/update_weights_from_distributed`: a broadcast from rank 0 of a process group made the way
  SGLang makes it (`init_weight_update_group`), tensor by tensor in the request's order.
"""

from __future__ import annotations

import base64
import contextlib
import inspect
import io
import pickle
from datetime import timedelta
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_mgrpo.rollout.base import Completion, SamplingParams

PARTIAL = ":partial"


class ProtocolError(RuntimeError):
    """A response that does not have the fields SGLang's protocol promises."""


def weight_tag(model: str, version: Optional[int]) -> str:
    """The wire version string of weight set `model` at `version` ("base" when None)."""
    return f"{model}:{'base' if version is None else int(version)}"


# ---- /generate ------------------------------------------------------------------------------

def sampling_dict(params: SamplingParams, seed: Optional[int]) -> Dict[str, Any]:
    """SGLang `SamplingParams` fields for one completion."""
    out: Dict[str, Any] = {
        "temperature": float(params.temperature), "top_p": float(params.top_p),
        "max_new_tokens": int(params.max_new_tokens),
        "stop_token_ids": [int(t) for t in params.stop_token_ids], "n": 1,
        # Keep the stop token in the output, as the engine interface promises; and stop on
        # the caller's stop tokens only (it includes the EOS id), not on the model's own EOS.
        "no_stop_trim": True, "skip_special_tokens": False, "ignore_eos": True}
    if params.top_k != -1:
        out["top_k"] = int(params.top_k)
    if params.min_new_tokens:
        out["min_new_tokens"] = int(params.min_new_tokens)
    if seed is not None:
        out["sampling_seed"] = int(seed)
    return out


def generate_request(prompts: Sequence[Sequence[int]], seeds: Sequence[Optional[int]],
                     params: SamplingParams) -> Dict[str, Any]:
    """A `/generate` body (SGLang `GenerateReqInput`): one completion per prompt."""
    return {"input_ids": [[int(t) for t in p] for p in prompts],
            "sampling_params": [sampling_dict(params, s) for s in seeds],
            "return_logprob": True, "logprob_start_len": -1, "stream": False}


def completion_from_item(item: Dict[str, Any]) -> Tuple[Completion, Optional[str]]:
    """(Completion, weight_version) of one `/generate` response item."""
    try:
        meta = item["meta_info"]
        pairs = meta["output_token_logprobs"]
        finish = meta["finish_reason"]
    except (KeyError, TypeError):
        raise ProtocolError("a /generate response item lacks meta_info.output_token_logprobs "
                            f"or finish_reason (was return_logprob dropped?): {str(item)[:200]}"
                            ) from None
    kind = finish.get("type") if isinstance(finish, dict) else finish
    if kind not in ("stop", "length"):
        raise ProtocolError(f"a completion ended with finish_reason {finish!r} (aborted?)")
    tokens = [int(p[1]) for p in pairs]
    logprobs = [float(p[0]) for p in pairs]
    return (Completion(token_ids=tokens, logprobs=logprobs, finish_reason=kind),
            meta.get("weight_version"))


def generate_response(completions: Sequence[Completion], weight_version: str,
                      prompt_lengths: Sequence[int]) -> List[Dict[str, Any]]:
    """The `/generate` response items of a server that made `completions`."""
    out = []
    for c, plen in zip(completions, prompt_lengths):
        finish = ({"type": "stop", "matched": c.token_ids[-1]} if c.finish_reason == "stop"
                  else {"type": "length", "length": len(c.token_ids)})
        out.append({"text": "", "output_ids": list(c.token_ids), "meta_info": {
            "finish_reason": finish, "prompt_tokens": plen,
            "completion_tokens": len(c.token_ids),
            "output_token_logprobs": [[lp, t, None] for lp, t in zip(c.logprobs, c.token_ids)],
            "weight_version": weight_version}})
    return out


# ---- weight updates -------------------------------------------------------------------------

def tensor_update_request(payload: str, tp_size: int, weight_version: str,
                          load_format: Optional[str] = None) -> Dict[str, Any]:
    """`/update_weights_from_tensor` (SGLang `UpdateWeightsFromTensorReqInput`); load_format
    "flattened_bucket" for a `serialize_flattened_bucket` payload."""
    return {"serialized_named_tensors": [payload] * tp_size, "load_format": load_format,
            "flush_cache": False, "weight_version": weight_version}


def disk_update_request(path: str, weight_version: str) -> Dict[str, Any]:
    """`/update_weights_from_disk` (SGLang `UpdateWeightFromDiskReqInput`)."""
    return {"model_path": path, "load_format": None, "abort_all_requests": False,
            "weight_version": weight_version}


def distributed_update_request(bucket: Sequence[Tuple[str, torch.Tensor]], group_name: str,
                               weight_version: str) -> Dict[str, Any]:
    """`/update_weights_from_distributed` (SGLang `UpdateWeightsFromDistributedReqInput`)."""
    return {"names": [n for n, _ in bucket], "dtypes": [dtype_name(t.dtype) for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket], "group_name": group_name,
            "flush_cache": False, "abort_all_requests": False,
            "weight_version": weight_version}


def init_group_request(master_address: str, master_port: int, rank_offset: int,
                       world_size: int, group_name: str, backend: str) -> Dict[str, Any]:
    """`/init_weights_update_group` (SGLang `InitWeightsUpdateGroupReqInput`)."""
    return {"master_address": master_address, "master_port": int(master_port),
            "rank_offset": int(rank_offset), "world_size": int(world_size),
            "group_name": group_name, "backend": backend}


def session_request() -> Dict[str, Any]:
    """`/begin_weight_update` (SGLang `BeginWeightUpdateReqInput`; `/end_weight_update` takes
    `{}`): 0.5.23 refuses tensor and distributed loads outside such a session."""
    return {"selector": "all"}


def abort_request(rid: Optional[str] = None) -> Dict[str, Any]:
    """`/abort_request` (SGLang `AbortReq`): one request by its rid, or all of them."""
    return {"rid": rid, "abort_all": True} if rid is None else {"rid": rid, "abort_all": False}


def memory_request(tags: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """`/release_memory_occupation`, `/resume_memory_occupation` (SGLang
    `Release/ResumeMemoryOccupationReqInput`): None means weights, KV cache and CUDA graphs."""
    return {"tags": None if tags is None else list(tags)}


SESSION_SINCE = (0, 5, 23)
"""The first SGLang version the client brackets tensor and distributed loads for."""


def parse_version(text: Any) -> Tuple[int, ...]:
    """(0, 5, 23) of "0.5.23", "0.5.23.post1", "0.5.24rc1"; () when there is none."""
    import re

    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", str(text or ""))
    return tuple(int(x) for x in m.group(1).split(".")) if m else ()


def version_request(new_version: str) -> Dict[str, Any]:
    """`/update_weight_version` (SGLang `UpdateWeightVersionReqInput`)."""
    return {"new_version": new_version, "abort_all_requests": False}


def dtype_name(dtype: torch.dtype) -> str:
    """SGLang's spelling of a dtype in `update_weights_from_distributed` ("bfloat16")."""
    return str(dtype).replace("torch.", "")


def wire_view(t: torch.Tensor, group) -> torch.Tensor:
    """The tensor as broadcast over the weight-update group `group`: over gloo, which has no
    FP8 type, FP8 travels as its bytes (uint8, the same bytes); NCCL takes FP8 as it is."""
    import torch.distributed as dist

    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and dist.get_backend(group) == "gloo":
        return t.view(torch.uint8)
    return t


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def serialize_named_tensors(named: Sequence[Tuple[str, torch.Tensor]]) -> str:
    """SGLang `MultiprocessingSerializer.serialize(named, output_str=True)`: base64 of a
    ForkingPickler dump. CPU tensors are moved into shared memory named by file (the
    file-descriptor strategy only works between a parent and its children); the caller keeps
    them alive until the server has copied them."""
    import torch.multiprocessing as tmp
    from multiprocessing.reduction import ForkingPickler

    buf = io.BytesIO()
    with _sharing_strategy(tmp, "file_system"):
        ForkingPickler(buf).dump([(n, t) for n, t in named])
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ---- tensor payloads: SGLang's MultiprocessingSerializer, both ends -------------------------

SGLANG_METADATA = ("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorMetadata")
"""Where SGLang's unpickler finds a flattened bucket's metadata class."""
SGLANG_LOCAL_TENSOR = (("sglang.srt.model_executor.model_runner_components.weight_updater",
                        "LocalSerializedTensor"),
                       ("sglang.srt.model_executor.model_runner", "LocalSerializedTensor"))
"""Where verl's per-rank tensor wrapper lives (its newer and older module)."""


class _Fields:
    """Plain attribute holder (what SGLang's dataclass instance unpickles into here)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.__dict__})"


class WireMetadata(_Fields):
    """FlattenedTensorMetadata as this side builds and reads it."""

    def __init__(self, name: str, shape, dtype: torch.dtype, start_idx: int, end_idx: int):
        self.name, self.shape, self.dtype = name, torch.Size(shape), dtype
        self.start_idx, self.end_idx, self.numel = start_idx, end_idx, end_idx - start_idx


class LocalSerializedTensor(_Fields):
    """verl's wrapper: `values[rank]` is that TP rank's own serialized tensor."""

    def __init__(self, values: Sequence[bytes] = ()):
        self.values = list(values)


def flatten_bucket(named: Sequence[Tuple[str, torch.Tensor]], shared: bool = True
                   ) -> Dict[str, Any]:
    """A bucket in SGLang's `FlattenedTensorBucket` layout: every tensor's bytes, in order, in
    one uint8 tensor (any mix of dtypes), plus one metadata record per tensor (its byte range,
    which SGLang's reader slices by). Unlike SGLang's own writer, each tensor starts at a
    multiple of 16 bytes, so that viewing its bytes as its dtype never fails on alignment.
    Built straight in shared memory on CPU (`shared`): the bytes are copied once on the way."""
    if not named:
        raise ValueError("cannot flatten an empty bucket")
    meta, start = [], 0
    for name, t in named:
        size = t.numel() * t.element_size()
        meta.append(WireMetadata(name, t.shape, t.dtype, start, start + size))
        start += -(-size // 16) * 16
    device = named[0][1].device
    flat = torch.empty(start, dtype=torch.uint8, device=device)
    if shared and device.type == "cpu":
        flat.share_memory_()
    for (_, t), m in zip(named, meta):
        flat[m.start_idx:m.end_idx].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
    return {"flattened_tensor": flat, "metadata": meta}


def serialize_flattened_bucket(bucket: Dict[str, Any]) -> str:
    """`serialized_named_tensors[rank]` of a `load_format: "flattened_bucket"` update, from
    `flatten_bucket`'s result: what slime sends
    (`MultiprocessingSerializer.serialize({"flattened_tensor", "metadata"})`). The caller
    keeps `bucket` alive until the servers have copied it (its memory is named, not sent)."""
    return base64.b64encode(dumps_for_sglang(bucket)).decode("ascii")


class _WirePickler(pickle._Pickler):  # the Python pickler: save_global can be overridden
    """ForkingPickler's tensor reductions, and our metadata written under SGLang's name."""

    def __init__(self, f):
        import copyreg
        from multiprocessing.reduction import ForkingPickler

        import torch.multiprocessing  # noqa: F401  (registers the tensor reductions)

        super().__init__(f, protocol=4)
        self.dispatch_table = copyreg.dispatch_table.copy()
        self.dispatch_table.update(ForkingPickler._extra_reducers)

    def save_global(self, obj, name=None):
        wire = {WireMetadata: SGLANG_METADATA, LocalSerializedTensor: SGLANG_LOCAL_TENSOR[0]
                }.get(obj)
        if wire is None:
            return super().save_global(obj, name)
        self.save(wire[0])
        self.save(wire[1])
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)


def dumps_for_sglang(obj) -> bytes:
    """A pickle as SGLang's `MultiprocessingSerializer` writes it (CPU tensors as shared
    memory named by file), with our `WireMetadata` and `LocalSerializedTensor` written under
    SGLang's class names. The caller keeps the tensors alive until read."""
    import torch.multiprocessing as tmp

    buf = io.BytesIO()
    with _sharing_strategy(tmp, "file_system"):
        _WirePickler(buf).dump(obj)
    return buf.getvalue()


class TensorUnpickler(pickle.Unpickler):
    """Rebuilds tensors, storages, dtypes and the containers around them, and nothing else:
    `/update_weights_from_tensor` takes pickles from the network. An exact list of globals,
    as SGLang's `SafeUnpickler` (a module prefix such as `torch.` would let in callables like
    `torch.serialization.save`, which writes files). Shared memory is opened by name only
    (`file_system`); CUDA IPC handles are refused (this server runs on CPU)."""

    ALLOWED = {
        ("builtins", "list"), ("builtins", "tuple"), ("builtins", "dict"), ("builtins", "int"),
        ("builtins", "str"), ("builtins", "bytes"), ("collections", "OrderedDict"),
        ("copyreg", "__newobj__"), ("torch", "Tensor"), ("torch.nn.parameter", "Parameter"),
        ("torch", "Size"), ("torch", "dtype"), ("torch", "device"),
        ("torch.storage", "UntypedStorage"), ("torch.storage", "TypedStorage"),
        ("torch", "UntypedStorage"),
        ("torch.multiprocessing.reductions", "rebuild_tensor"),
        ("torch.multiprocessing.reductions", "rebuild_storage_filename"),
        ("torch.multiprocessing.reductions", "rebuild_storage_empty"),
        ("torch.multiprocessing.reductions", "rebuild_typed_storage"),
    } | {("torch", str(d).replace("torch.", "")) for d in (
        torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int16,
        torch.int32, torch.int64, torch.uint8, torch.bool, torch.float8_e4m3fn,
        torch.float8_e5m2)}

    LOCAL = {SGLANG_METADATA: WireMetadata,
             **{k: LocalSerializedTensor for k in SGLANG_LOCAL_TENSOR}}

    def find_class(self, module: str, name: str):
        if (module, name) in self.LOCAL:
            return self.LOCAL[(module, name)]
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _loads(data) -> Any:
    import torch.multiprocessing  # noqa: F401  (registers the storage rebuild functions)

    if isinstance(data, str):
        data = base64.b64decode(data, validate=True)
    return TensorUnpickler(io.BytesIO(bytes(data))).load()


def deserialize_named_tensors(payload: str, load_format: Optional[str] = None
                              ) -> List[Tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of one TP rank's `serialized_named_tensors` entry: a list of
    pairs (values may be verl's `LocalSerializedTensor`), or, with `load_format:
    "flattened_bucket"`, SGLang's flattened bucket. ValueError for anything else."""
    obj = _loads(payload)
    if load_format == "flattened_bucket":
        return _unflatten(obj)
    if not isinstance(obj, (list, tuple)) or not all(
            isinstance(x, (list, tuple)) and len(x) == 2 and isinstance(x[0], str)
            for x in obj):
        raise ValueError("serialized_named_tensors: expected a list of (name, tensor) pairs")
    out = []
    for name, t in obj:
        if isinstance(t, LocalSerializedTensor):
            values = getattr(t, "values", None)
            if not isinstance(values, (list, tuple)) or not values:
                raise ValueError(f"{name}: a LocalSerializedTensor without values")
            t = _loads(values[0])  # TP size 1: rank 0's own tensor
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
        out.append((name, t))
    return out


def _unflatten(obj) -> List[Tuple[str, torch.Tensor]]:
    if not isinstance(obj, dict) or set(obj) != {"flattened_tensor", "metadata"}:
        raise ValueError("flattened_bucket: expected {'flattened_tensor', 'metadata'}")
    flat, meta = obj["flattened_tensor"], obj["metadata"]
    if not isinstance(flat, torch.Tensor) or flat.dim() != 1:
        raise ValueError("flattened_bucket: flattened_tensor must be a 1-D tensor")
    if not isinstance(meta, (list, tuple)) or not meta:
        raise ValueError("flattened_bucket: metadata must be a non-empty list")
    raw = flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat
    out = []
    for m in meta:
        if not isinstance(m, WireMetadata):
            raise ValueError(f"flattened_bucket: metadata entry {type(m).__name__}")
        try:
            name, shape, dtype = str(m.name), torch.Size(m.shape), m.dtype
            start, end = int(m.start_idx), int(m.end_idx)
        except (AttributeError, TypeError, ValueError) as e:
            raise ValueError(f"flattened_bucket: bad metadata entry ({e})") from None
        if not isinstance(dtype, torch.dtype) or not 0 <= start <= end <= raw.numel() or \
                end - start != shape.numel() * dtype.itemsize:
            raise ValueError(f"flattened_bucket: {name}: bytes [{start}, {end}) do not hold "
                             f"{tuple(shape)} {dtype} inside {raw.numel()} bytes")
        piece = raw[start:end]
        if start % dtype.itemsize:  # SGLang's own writer does not align: copy, then view
            piece = piece.clone()
        out.append((name, piece.view(dtype).reshape(shape)))
    return out


@contextlib.contextmanager
def _sharing_strategy(tmp, strategy: str):
    before = tmp.get_sharing_strategy()
    tmp.set_sharing_strategy(strategy)
    try:
        yield
    finally:
        tmp.set_sharing_strategy(before)


def init_weight_update_group(backend: str, master_address: str, master_port: int, rank: int,
                             world_size: int, group_name: str, timeout_s: float = 600.0):
    """A process group apart from the default one, made as SGLang's `init_custom_process_group`
    makes it (a TCP rendezvous, a PrefixStore named after the group), so that the trainer's end
    and SGLang's end meet. Rank 0 is the trainer; servers take ranks from their rank_offset."""
    from torch.distributed.distributed_c10d import (Backend, PrefixStore,
                                                    _new_process_group_helper, _world,
                                                    rendezvous)

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(f"tcp://{master_address}:{master_port}", rank,
                                              world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    options = ("backend_options" if "backend_options"
               in inspect.signature(_new_process_group_helper).parameters else "pg_options")
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store,
                                         group_name=group_name, timeout=timeout,
                                         **{options: None})
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group
