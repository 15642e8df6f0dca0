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
        # Keep the stop token in the output, as the engine interface promises.
        "no_stop_trim": True, "skip_special_tokens": False}
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

def tensor_update_request(payload: str, tp_size: int, weight_version: str) -> Dict[str, Any]:
    """`/update_weights_from_tensor` (SGLang `UpdateWeightsFromTensorReqInput`)."""
    return {"serialized_named_tensors": [payload] * tp_size, "load_format": None,
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


class _TensorUnpickler(pickle.Unpickler):
    """Rebuilds torch tensors and nothing else: the endpoint takes pickles from the network."""

    def find_class(self, module: str, name: str):
        if module == "torch" or module.startswith("torch.") or (
                module == "builtins" and name in ("list", "tuple", "dict")) or (
                module == "collections" and name == "OrderedDict"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def deserialize_named_tensors(payload: str) -> List[Tuple[str, torch.Tensor]]:
    import torch.multiprocessing  # noqa: F401  (registers the storage rebuild functions)

    named = _TensorUnpickler(io.BytesIO(base64.b64decode(payload, validate=True))).load()
    if not isinstance(named, (list, tuple)) or not all(
            isinstance(x, (list, tuple)) and len(x) == 2 and isinstance(x[1], torch.Tensor)
            for x in named):
        raise ValueError("serialized_named_tensors: expected a list of (name, tensor) pairs")
    return [(str(n), t) for n, t in named]


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
