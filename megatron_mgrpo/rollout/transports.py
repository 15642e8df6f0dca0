"""How weights reach SGLang servers, one small class per SGLang RL endpoint.

- `TensorTransport` (colocated servers): each bucket serialized once as CUDA IPC handles (GPU)
  or shared-memory names (CPU), POSTed to `/update_weights_from_tensor` of every server. By
  default as one flattened bucket (`load_format: "flattened_bucket"`, SGLang's
  `FlattenedTensorBucket` layout: one uint8 tensor and a metadata record per tensor), so a push
  costs one IPC handle and a few small objects per bucket instead of one per tensor.
- `DistributedTransport` (servers elsewhere): one process group of the trainer (rank 0) and
  every server's ranks, made through `/init_weights_update_group`; per bucket a POST to
  `/update_weights_from_distributed` with names, dtypes and shapes, then one broadcast per
  tensor in that order (NCCL on GPU, gloo on CPU).
- `DiskTransport` (a shared filesystem): the update written as safetensors shards of at most
  one bucket each, then `/update_weights_from_disk` on every server.

`stage` turns the trainer's one-pass bucket stream into something that can be sent again (a
host copy, or the files): what a swap between weight sets and the recovery of a restarted
server need. `send` takes either the stage or the stream. It raises `PushFailed` naming the
server that did not answer, or `WeightUpdateError` when a server refused the update (a wrong
name or shape: retrying cannot help).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from megatron_mgrpo.parallel import free_port
from megatron_mgrpo.rollout import protocol
from megatron_mgrpo.rollout.base import Bucket, WeightUpdateError
from megatron_mgrpo.rollout.servers import Server, ServerError


_GROUP_IDS = itertools.count(1)


class PushFailed(RuntimeError):
    """A server did not take part in a weight push (no answer, timeout, dropped connection)."""

    def __init__(self, server: Server, error: BaseException):
        super().__init__(f"weight push to {server.url} failed: {error}")
        self.server = server


class HostCopy(list):
    """A staged update: its buckets, copied to host memory."""


class DiskCopy(str):
    """A staged update: the directory of its safetensors files."""


def _each(servers: Sequence[Server], fn) -> None:
    """fn(server) on every server at once; the first failure raised as PushFailed or
    WeightUpdateError (an HTTP 4xx is a refusal)."""
    errors: Dict[Server, BaseException] = {}

    def run(s):
        try:
            fn(s)
        except BaseException as e:  # noqa: BLE001 - sorted out below
            errors[s] = e

    if len(servers) == 1:
        run(servers[0])
    else:
        with ThreadPoolExecutor(len(servers)) as pool:
            list(pool.map(run, servers))
    for s, e in errors.items():
        if isinstance(e, ServerError) and e.status is not None and 400 <= e.status < 500:
            raise WeightUpdateError(f"{s.url} refused the update: {e}") from None
    for s, e in errors.items():
        raise PushFailed(s, e) from e


class Transport:
    name = ""
    needs_session = False
    """SGLang 0.5.23 takes this transport's loads only inside /begin_weight_update ...
    /end_weight_update."""

    def __init__(self, timeout_s: float = 600.0):
        self.timeout_s = timeout_s

    def stage(self, model: str, version: Optional[int], buckets: Iterable[Bucket]):
        copy = HostCopy()
        for bucket in buckets:
            copy.append([(n, t.detach().to("cpu", copy=True)) for n, t in bucket])
        return copy

    def send(self, servers: Sequence[Server], source, tag: str) -> None:
        raise NotImplementedError

    def forget(self, server: Server) -> None:
        """`server` was restarted or dropped: drop whatever state was shared with it."""

    def close(self) -> None:
        pass


class TensorTransport(Transport):
    name = "tensor"
    needs_session = True

    def __init__(self, timeout_s: float = 600.0, flattened: bool = True):
        super().__init__(timeout_s)
        self.flattened = flattened
        """One flattened bucket per request (False: a list of (name, tensor) pairs)."""

    def send(self, servers, source, tag):
        partial = tag + protocol.PARTIAL
        fmt = "flattened_bucket" if self.flattened else None
        for bucket in source:
            if not bucket:
                continue
            if self.flattened:  # `flat` holds the shared memory until every server copied it
                flat = protocol.flatten_bucket(bucket)
                payload = protocol.serialize_flattened_bucket(flat)
            else:
                payload = protocol.serialize_named_tensors(bucket)  # once for all servers
            _each(servers, lambda s: s.call("/update_weights_from_tensor",
                                            protocol.tensor_update_request(
                                                payload, s.tp_size, partial, fmt),
                                            self.timeout_s))


class DiskTransport(Transport):
    name = "disk"

    def __init__(self, directory: str, bucket_bytes: int, hf_config: Optional[dict] = None,
                 timeout_s: float = 600.0):
        super().__init__(timeout_s)
        if not directory:
            raise ValueError("the disk transport needs a directory shared with the servers")
        self.directory = directory
        self.bucket_bytes = bucket_bytes
        self.hf_config = hf_config

    def stage(self, model, version, buckets) -> DiskCopy:
        from megatron_mgrpo.weights.safetensors_io import StreamingWriter

        final = os.path.join(self.directory, model, f"v{'base' if version is None else version}")
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        index: Dict[str, str] = {}
        for i, bucket in enumerate(buckets):
            name = f"model-{i + 1:05d}.safetensors"
            w = StreamingWriter(os.path.join(tmp, name),
                                [(n, t.shape, t.dtype) for n, t in bucket])
            for n, t in bucket:
                w.write(n, t.detach().cpu())
                index[n] = name
            w.close()
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": index}, f)
        if self.hf_config:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(self.hf_config, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in os.listdir(os.path.join(self.directory, model)):  # one version per set
            if old != os.path.basename(final):
                shutil.rmtree(os.path.join(self.directory, model, old), ignore_errors=True)
        return DiskCopy(final)

    def send(self, servers, source, tag):
        if not isinstance(source, DiskCopy):
            model, version = tag.split(":", 1)
            source = self.stage(model, version, source)
        body = protocol.disk_update_request(str(source), tag + protocol.PARTIAL)
        _each(servers, lambda s: s.call("/update_weights_from_disk", body, self.timeout_s))


class DistributedTransport(Transport):
    name = "distributed"
    needs_session = True

    def __init__(self, backend: str = "nccl", master_address: str = "127.0.0.1",
                 timeout_s: float = 600.0):
        super().__init__(timeout_s)
        self.backend = backend
        self.master_address = master_address
        self._groups: Dict[Tuple[str, ...], Tuple[str, object]] = {}
        self._members: Dict[str, List[Server]] = {}
        self.device = torch.device("cuda" if backend == "nccl" else "cpu")

    def _group(self, servers: Sequence[Server]):
        key = tuple(s.url for s in servers)
        if key not in self._groups:
            # Unique for the servers' lifetime: a server process keeps every name it joined.
            name = f"mgrpo_weights_{os.getpid()}_{next(_GROUP_IDS)}_{uuid.uuid4().hex[:8]}"
            port = free_port(self.master_address)
            world = 1 + sum(s.tp_size for s in servers)
            offsets, off = [], 1
            for s in servers:
                offsets.append(off)
                off += s.tp_size
            result: Dict[str, BaseException] = {}

            def join(s, offset):  # each call blocks until every rank has joined
                try:
                    s.call("/init_weights_update_group", protocol.init_group_request(
                        self.master_address, port, offset, world, name, self.backend),
                        self.timeout_s)
                except BaseException as e:  # noqa: BLE001
                    result[s.url] = e

            threads = [threading.Thread(target=join, args=(s, o), daemon=True)
                       for s, o in zip(servers, offsets)]
            for t in threads:
                t.start()
            ours: Dict[str, object] = {}

            def make():
                try:
                    ours["group"] = protocol.init_weight_update_group(
                        self.backend, self.master_address, port, 0, world, name, self.timeout_s)
                except BaseException as e:  # noqa: BLE001
                    ours["error"] = e

            mine = threading.Thread(target=make, daemon=True)
            mine.start()
            # A server that refuses to join would leave our rendezvous waiting out its
            # timeout: watch both ends and give up as soon as one side fails.
            deadline = time.monotonic() + self.timeout_s
            while mine.is_alive() and time.monotonic() < deadline and not (
                    result and not all(t.is_alive() for t in threads)):
                mine.join(0.05)
            for s in servers:
                if s.url in result:
                    raise PushFailed(s, result[s.url])
            if "group" not in ours:
                raise PushFailed(servers[0], ours.get("error") or TimeoutError(
                    f"the weight update group {name} did not form in {self.timeout_s:.0f} s"))
            for t in threads:
                t.join(self.timeout_s)
            self._groups[key] = (name, ours["group"])
            self._members[name] = list(servers)
        return self._groups[key]

    def send(self, servers, source, tag):
        import torch.distributed as dist

        name, group = self._group(servers)
        for bucket in source:
            body = protocol.distributed_update_request(bucket, name, tag + protocol.PARTIAL)
            errors: List[BaseException] = []

            def post():
                try:
                    _each(servers, lambda s: s.call("/update_weights_from_distributed", body,
                                                    self.timeout_s))
                except BaseException as e:  # noqa: BLE001 - re-raised after the broadcasts
                    errors.append(e)

            t = threading.Thread(target=post, daemon=True)
            t.start()
            try:
                for _, tensor in bucket:  # the order the servers receive them in
                    dist.broadcast(protocol.wire_view(tensor.detach().to(self.device)
                                                      .contiguous(), group),
                                   group=group, group_src=0)
            except BaseException as e:
                t.join(self.timeout_s)
                self._drop(servers)
                raise PushFailed(servers[0], e) from e
            t.join(self.timeout_s)
            if errors:
                self._drop(servers)
                raise errors[0]

    def _drop(self, servers) -> None:
        for s in servers:
            self.forget(s)

    def forget(self, server):
        for key in [k for k in self._groups if server.url in k]:
            self._drop_group(key, server.url)

    def close(self):
        for key in list(self._groups):
            self._drop_group(key)

    def _drop_group(self, key, gone: Optional[str] = None) -> None:
        """Leave a group; its members other than `gone` (which died) leave it too."""
        import torch.distributed as dist

        name, group = self._groups.pop(key)
        for s in self._members.pop(name, []):
            if s.url != gone:
                try:
                    s.call("/destroy_weights_update_group", {"group_name": name}, 10.0)
                except ServerError:
                    pass
        try:
            dist.destroy_process_group(group)
        except Exception:  # noqa: BLE001 - a broken group may not tear down cleanly
            pass


def make_transport(kind: str, bucket_bytes: int, directory: str = "",
                   hf_config: Optional[dict] = None, backend: str = "nccl",
                   master_address: str = "127.0.0.1", timeout_s: float = 600.0,
                   flattened: bool = True) -> Transport:
    if kind == "tensor":
        return TensorTransport(timeout_s, flattened)
    if kind == "disk":
        return DiskTransport(directory, bucket_bytes, hf_config, timeout_s)
    if kind == "distributed":
        return DistributedTransport(backend, master_address, timeout_s)
    raise ValueError(f"unknown weight transport {kind!r}; accepted: tensor | distributed | disk")
