"""The rollout engine at scale: SGLang servers (or `mgrpo serve`) behind the engine interface.

Placement of the two weight sets:
- `swap`: one group of servers. An update is staged (a host copy, or files for the disk
  transport) and loaded when its set is next sampled from; `generation_order` puts first the
  set the servers already hold, so a step costs one load when the momentum model did not move
  since (momentum pushes every K steps) and two when it did.
- `separate`: a group per set; an update goes straight to its group.
Within a group the servers are data-parallel replicas: a `generate` call is cut into requests
of at most `max_prompts_per_request` completions, handed out from one queue to a worker per
server, so a fast server takes more.

Versions: each set's version is stamped on the servers (`policy:12`, SGLang's weight_version)
only after every bucket arrived; every `/generate` response carries the version that made it,
and a completion from any other version is thrown away and redone.

SGLang versions: each server is asked once for `/server_info` (`version`); one older than
0.5.23 (`protocol.SESSION_SINCE`) is refused in one line, since the contract below is the one
tested against 0.5.23's own server (tests/test_sglang_contract.py). Tensor and distributed loads
run inside `/begin_weight_update` ... `/end_weight_update`, as 0.5.23 requires; the held weight
version is read from `/model_info`; `/flush_cache` answers text and 400 while requests run, and
is retried until it succeeds, since a prefix cache filled by the old weights must never serve
the new ones.

Memory: with `release_memory` (swap placement, servers colocated on the training GPUs),
`release_memory()` hands the servers' weights and KV cache back before training
(`/release_memory_occupation`); the next load resumes them first (`/resume_memory_occupation`)
and then loads the weights, which the release dropped.

Faults: a request that gets no answer in `request_timeout_s` (a dead or hung server) marks the
server failed. One we launched is killed and started again on its port, then given the current
weights from the staged copy; one we attached to is told to drop its requests
(`/abort_request`), probed, and dropped if it does not answer.
Its requests go back on the queue for any server (at most `max_retries` times each). A call
either returns every completion or raises `RolloutError`: never a partial batch. A weight
update that fails is retried from the staged copy (restarting the server at fault) up to
`max_retries` times; otherwise the set stays unusable (`generate` raises) until an update
completes, and the servers report `...:partial`, never a version they do not hold.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from megatron_mgrpo.rollout import protocol
from megatron_mgrpo.rollout.base import (WEIGHT_SETS, Bucket, Completion, RolloutEngine,
                                         RolloutError, SamplingParams, WeightsNotReadyError,
                                         WeightUpdateError, check_weight_set)
from megatron_mgrpo.rollout.embedded import stream_seeds
from megatron_mgrpo.rollout.servers import Server, ServerError
from megatron_mgrpo.rollout.transports import PushFailed, Transport, _each

__all__ = ["RolloutError", "SGLangEngine", "make_sglang_engine"]


class SGLangEngine(RolloutEngine):
    def __init__(self, groups: Dict[str, List[Server]], transport: Transport, *,
                 host_copy: bool = True, request_timeout_s: float = 600.0,
                 max_retries: int = 2, max_prompts_per_request: int = 64,
                 launch_timeout_s: float = 600.0, send_seeds: bool = True,
                 release_memory: bool = False, log: Callable[[str], None] = print):
        """groups: the servers of each weight set; the same list object for both sets means
        the swap placement. host_copy: keep each set's last update in host memory (always
        so for swap; for separate it lets a restarted server be brought up to date at once
        rather than at the next update). send_seeds: pass each completion's sampling_seed.
        release_memory: `release_memory()` releases the servers' GPU memory (swap placement
        only: each load then brings the weights back)."""
        if set(groups) != set(WEIGHT_SETS) or not groups["policy"]:
            raise ValueError("SGLangEngine needs servers for 'policy' and 'momentum'")
        self.groups = groups
        self.placement = "swap" if groups["policy"] is groups["momentum"] else "separate"
        self.transport = transport
        self.host_copy = host_copy or self.placement == "swap"
        self.request_timeout_s = request_timeout_s
        self.max_retries = max_retries
        self.max_prompts_per_request = max_prompts_per_request
        self.launch_timeout_s = launch_timeout_s
        self.send_seeds = send_seeds
        self.log = log
        if release_memory and self.placement != "swap":
            raise ValueError("release_memory needs the swap placement (every generate is "
                             "preceded by a load from the staged copy)")
        self.release_memory_enabled = release_memory
        self._version: Dict[str, Optional[int]] = {m: None for m in WEIGHT_SETS}
        self._broken: Dict[str, Optional[str]] = {m: None for m in WEIGHT_SETS}
        self._staged: Dict[str, object] = {m: None for m in WEIGHT_SETS}
        self.stats = collections.Counter()
        """loads (weight pushes to a server), restarts, dropped, retried requests."""
        for s in self._servers():
            self._introduce(s)

    # ---- servers ----------------------------------------------------------------------------

    def _servers(self) -> List[Server]:
        seen, out = set(), []
        for group in self.groups.values():
            for s in group:
                if id(s) not in seen:
                    seen.add(id(s))
                    out.append(s)
        return out

    def _introduce(self, s: Server) -> None:
        """Learn the server's SGLang version, TP size and the weights it holds."""
        s.log = self.log
        try:
            info = s.call("/server_info", timeout=self.request_timeout_s)
        except ServerError as e:
            if e.status != 404:
                raise
            info = {}  # SGLang before 0.5.x named it /get_server_info
        if not isinstance(info, dict):
            raise RolloutError(f"{s.url}/server_info: not an SGLang server info object: "
                               f"{str(info)[:100]!r}")
        s.version = protocol.parse_version(info.get("version"))
        if s.version < protocol.SESSION_SINCE:
            need = ".".join(map(str, protocol.SESSION_SINCE))
            raise RolloutError(f"{s.url} runs SGLang {info.get('version') or '(unknown)'}; "
                               f"this client needs SGLang >= {need} (its weight-update "
                               f"sessions and /model_info)")
        s.tp_size = int(info.get("tp_size") or 1)
        s.released = False
        s.holds = self._held(s)

    def _held(self, s: Server, timeout: Optional[float] = None) -> Optional[str]:
        """The weight version the server reports (/model_info's)."""
        info = s.call("/model_info", timeout=timeout or self.request_timeout_s)
        if not isinstance(info, dict) or "weight_version" not in info:
            raise RolloutError(f"{s.url}/model_info has no weight_version: "
                               f"{str(info)[:100]!r}")
        return info["weight_version"]

    def _abort(self, s: Server) -> None:
        """Best effort: drop every request the server still runs (a stalled request we gave
        up on must not keep the server busy)."""
        try:
            s.call("/abort_request", protocol.abort_request(), timeout=10.0)
        except ServerError:
            pass

    def _live(self, model: str) -> List[Server]:
        live = [s for s in self.groups[model] if s.alive]
        if not live:
            raise RolloutError(f"no {model} server is left: "
                               f"{', '.join(s.url for s in self.groups[model])} all failed")
        return live

    def _recover(self, s: Server, why: BaseException) -> None:
        """A server that failed: restart it (ours) or keep it only if it answers (attached)."""
        self.transport.forget(s)
        s.holds = None
        if s.process is not None:
            self.log(f"rollout: {s.url} failed ({why}); restarting it")
            self.stats["restarts"] += 1
            s.process.stop(grace=0)
            try:
                s.process.start()
                s.wait_healthy(self.launch_timeout_s)
                self._introduce(s)
                return
            except (ServerError, OSError) as e:
                why = e
        else:
            self._abort(s)
            if s.healthy():
                return
        self.log(f"rollout: dropping {s.url} ({why})")
        self.stats["dropped"] += 1
        s.alive = False

    def close(self) -> None:
        """Leave the transport's groups; kill every server we launched (its process group)."""
        try:
            self.transport.close()
        finally:
            for s in self._servers():
                if s.process is not None:
                    s.process.stop()

    # ---- weights ----------------------------------------------------------------------------

    def _tag(self, model: str) -> str:
        return protocol.weight_tag(model, self._version[model])

    def weight_version(self, model: str = "policy") -> Optional[int]:
        check_weight_set(model)
        return self._version[model]

    def update_weights(self, model: str, buckets: Iterable[Bucket], version: int) -> None:
        check_weight_set(model)
        self._version[model] = None
        self._broken[model] = f"the update to version {version} did not complete"
        tag = protocol.weight_tag(model, version)
        if self.host_copy or self.transport.name == "disk":
            self._staged[model] = self.transport.stage(model, version, buckets)
            if self.placement == "separate":
                self._sync(model, tag)
        else:
            self._staged[model] = None
            self._push(self._live(model), buckets, tag)  # a one-pass stream: no retry
        self._version[model] = version
        self._broken[model] = None

    def _push(self, servers: Sequence[Server], source, tag: str) -> None:
        """Mark the servers partial, send, confirm, check: afterwards each holds `tag`.
        Tensor and distributed loads run inside a weight-update session where the server's
        SGLang requires one (0.5.23)."""
        session = self.transport.needs_session
        timeout = self.transport.timeout_s

        def begin(s):
            s.holds = None
            if s.released:
                s.call("/resume_memory_occupation", protocol.memory_request(), timeout)
                s.released = False
            s.call("/pause_generation", {}, timeout)
            if session:
                _open_session(s, timeout)
            s.call("/update_weight_version", protocol.version_request(tag + protocol.PARTIAL))

        def confirm(s):
            if session:
                s.call("/end_weight_update", {}, timeout)
            s.call("/update_weight_version", protocol.version_request(tag), timeout)
            _flush(s, timeout, self.log)
            s.call("/continue_generation", {}, timeout)
            got = self._held(s, timeout)
            if got != tag:
                raise WeightUpdateError(f"{s.url} reports weight version {got!r} after the "
                                        f"update to {tag!r}")
            s.holds = tag

        _each(servers, begin)
        self.transport.send(servers, source, tag)
        _each(servers, confirm)
        self.stats["loads"] += len(servers)

    def release_memory(self) -> None:
        """Hand the servers' GPU memory (weights, KV cache, CUDA graphs) back for training;
        the next load resumes it and loads the weights again. A no-op unless the engine was
        made with release_memory=True."""
        if not self.release_memory_enabled:
            return

        def release(s):
            if not s.released:
                s.call("/release_memory_occupation", protocol.memory_request(),
                       self.request_timeout_s)
                s.released, s.holds = True, None

        try:
            _each([s for s in self.groups["policy"] if s.alive], release)
        except PushFailed as e:
            self._recover(e.server, e)
        self.stats["releases"] += 1

    def _sync(self, model: str, tag: str, servers: Optional[Sequence[Server]] = None) -> None:
        """Bring the servers (default: the set's whole group) to `tag` from the staged copy,
        restarting a server that fails, at most max_retries times."""
        failures = 0
        while True:
            group = servers if servers is not None else self._live(model)
            targets = [s for s in group if s.alive and s.holds != tag]
            if not targets:
                if servers is None:
                    self._live(model)
                return
            try:
                self._push(targets, self._staged[model], tag)
                return
            except PushFailed as e:
                failures += 1
                self._recover(e.server, e)
                if failures > self.max_retries:
                    raise WeightUpdateError(f"pushing {tag} failed {failures} times; last: "
                                            f"{e}") from e

    def generation_order(self, models: Sequence[str]) -> List[str]:
        """Swap placement: the set the servers hold now first (it needs no load)."""
        if self.placement != "swap":
            return list(models)
        held = {s.holds for s in self.groups["policy"] if s.alive}
        return sorted(models, key=lambda m: self._tag(m) not in held)

    # ---- sampling ---------------------------------------------------------------------------

    def generate(self, prompts: List[List[int]], n: int, params: SamplingParams,
                 model: str = "policy") -> List[List[Completion]]:
        check_weight_set(model)
        if self._broken[model]:
            raise WeightsNotReadyError(f"weight set {model!r} cannot generate: "
                                       f"{self._broken[model]}; push a complete update first")
        if n < 1:
            raise ValueError(f"generate: n must be >= 1, got {n}")
        if not prompts:
            return []
        tag = self._tag(model)
        checked = self._version[model] is not None  # base weights: whatever the server has
        if self._staged[model] is not None:
            self._sync(model, tag)
        rows = [list(map(int, p)) for p in prompts for _ in range(n)]
        seeds: List[Optional[int]] = [None] * len(rows)
        if self.send_seeds and params.seed is not None:
            seeds = stream_seeds(prompts, n, params.seed)
        size = self.max_prompts_per_request
        chunks = [range(i, min(i + size, len(rows))) for i in range(0, len(rows), size)]
        out: List[Optional[Completion]] = [None] * len(rows)
        queue = collections.deque(range(len(chunks)))
        tries = collections.Counter()
        lock = threading.Lock()
        fatal: List[BaseException] = []

        def serve(s: Server) -> None:
            while True:
                with lock:
                    if not queue or fatal or not s.alive:
                        return
                    c = queue.popleft()
                chunk = chunks[c]
                try:
                    items = s.call("/generate", protocol.generate_request(
                        [rows[i] for i in chunk], [seeds[i] for i in chunk], params),
                        self.request_timeout_s)
                    items = items if isinstance(items, list) else [items]
                    if len(items) != len(chunk):
                        raise protocol.ProtocolError(f"{s.url}: {len(items)} completions for "
                                                     f"{len(chunk)} prompts")
                    done = [protocol.completion_from_item(it) for it in items]
                    stale = [v for _, v in done if checked and v != tag]
                    if stale:
                        raise _Stale(f"{s.url} answered with weights {stale[0]!r}, not {tag!r}")
                    for i, (comp, _) in zip(chunk, done):
                        out[i] = comp
                    continue
                except ServerError as e:
                    if e.status is not None and 400 <= e.status < 500:
                        with lock:
                            fatal.append(ValueError(f"generate: {e}"))
                        return
                    error: BaseException = e
                except (protocol.ProtocolError, _Stale) as e:
                    error = e
                with lock:
                    tries[c] += 1
                    self.stats["retried"] += 1
                    if tries[c] > self.max_retries:
                        fatal.append(RolloutError(f"a request failed {tries[c]} times; last "
                                                  f"on {s.url}: {error}"))
                        return
                    queue.appendleft(c)
                if isinstance(error, ServerError):
                    self._recover(s, error)
                else:
                    s.holds = None
                if not s.alive:
                    return
                try:
                    if self._staged[model] is not None:
                        self._sync(model, tag, [s])
                    elif checked and s.holds != tag:
                        s.alive = False  # cannot be brought to this version before the next
                        return           # update: leave the work to the others
                except (WeightUpdateError, RolloutError) as e:
                    self.log(f"rollout: dropping {s.url}: {e}")
                    s.alive = False
                    return

        servers = [s for s in self._live(model) if not checked or s.holds == tag]
        threads = [threading.Thread(target=serve, args=(s,), daemon=True) for s in servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if fatal:
            for s in servers:
                if s.alive:
                    self._abort(s)
            raise fatal[0]
        missing = sum(c is None for c in out)
        if missing:
            raise RolloutError(f"generate({model}): {missing} of {len(out)} completions "
                               "could not be made by the servers left; no partial batch")
        return [out[i * n:(i + 1) * n] for i in range(len(prompts))]


class _Stale(RuntimeError):
    """A server answered with weights other than the set's current version."""


def _open_session(s: Server, timeout: float) -> None:
    """/begin_weight_update; a session left open by a push that broke off is closed first."""
    try:
        s.call("/begin_weight_update", protocol.session_request(), timeout)
    except ServerError as e:
        if e.status != 400 or "already open" not in str(e):
            raise
        s.call("/end_weight_update", {}, timeout)
        s.call("/begin_weight_update", protocol.session_request(), timeout)


def _flush(s: Server, timeout: float, log: Callable[[str], None]) -> None:
    """/flush_cache until it succeeds: SGLang answers 400 while requests run, and a prefix
    cache filled by the old weights must not serve the new ones. 404: a server without one."""
    start = time.monotonic()
    said = start
    while True:
        try:
            s.call("/flush_cache", {}, timeout)
            return
        except ServerError as e:
            if e.status in (404, 405):
                return
            if e.status != 400:
                raise
            now = time.monotonic()
            if now - start > timeout:
                raise WeightUpdateError(f"{s.url}/flush_cache: refused for {timeout:.0f} s "
                                        f"(requests still running?): {e}") from None
            if now - said > 20:
                said = now
                log(f"rollout: {s.url}/flush_cache refused while requests run; retrying "
                    f"({now - start:.0f} s of {timeout:.0f} s)")
            time.sleep(0.2)


def make_sglang_engine(g, model_path: str, bucket_bytes: int, run_dir: str,
                       hf_config: Optional[dict] = None,
                       log: Callable[[str], None] = print) -> SGLangEngine:
    """The engine of an `SGLangConfig`: launch or attach to its servers, pick the transport."""
    import os

    import torch

    from megatron_mgrpo.rollout.servers import launch
    from megatron_mgrpo.rollout.transports import make_transport

    if g.launch:
        if not model_path or not os.path.isdir(model_path):
            raise RolloutError(f"sglang.launch needs the HF model directory the servers start "
                               f"from (model.load), got {model_path!r}")
        count = g.launch * (2 if g.placement == "separate" else 1)
        log(f"rollout: launching {count} server(s): {g.launch_command}")
        servers = launch(g.launch_command, count, g.host, g.base_port, model_path,
                         os.path.join(run_dir, "server_logs"), g.launch_timeout_s, log)
        policy, momentum = servers[:g.launch], servers[g.launch:]
    else:
        policy = [Server(u, log=log) for u in g.urls]
        momentum = [Server(u, log=log) for u in g.momentum_urls]
        for s in policy + momentum:
            s.wait_healthy(g.launch_timeout_s)
    groups = {"policy": policy, "momentum": momentum if g.placement == "separate" else policy}
    backend = g.dist_backend if g.dist_backend != "auto" else (
        "nccl" if torch.cuda.is_available() else "gloo")
    transport = make_transport(g.transport, bucket_bytes,
                               g.disk_dir or os.path.join(run_dir, "pushed_weights"),
                               hf_config, backend, g.dist_master_address, g.request_timeout_s)
    try:
        return SGLangEngine(groups, transport, host_copy=g.host_copy,
                            request_timeout_s=g.request_timeout_s, max_retries=g.max_retries,
                            max_prompts_per_request=g.max_prompts_per_request,
                            launch_timeout_s=g.launch_timeout_s,
                            release_memory=g.release_memory,
                            log=log)
    except BaseException:
        for s in policy + momentum:
            if s.process is not None:
                s.process.stop(grace=0)
        raise

