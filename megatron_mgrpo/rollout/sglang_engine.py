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

Faults: a request that gets no answer in `request_timeout_s` (a dead or hung server) marks the
server failed. One we launched is killed and started again on its port, then given the current
weights from the staged copy; one we attached to is probed and dropped if it does not answer.
Its requests go back on the queue for any server (at most `max_retries` times each). A call
either returns every completion or raises `RolloutError`: never a partial batch. A weight
update that fails is retried from the staged copy (restarting the server at fault) up to
`max_retries` times; otherwise the set stays unusable (`generate` raises) until an update
completes, and the servers report `...:partial`, never a version they do not hold.
"""

from __future__ import annotations

import collections
import threading
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from megatron_mgrpo.rollout import protocol
from megatron_mgrpo.rollout.base import (WEIGHT_SETS, Bucket, Completion, RolloutEngine,
                                         SamplingParams, WeightsNotReadyError, WeightUpdateError,
                                         check_weight_set)
from megatron_mgrpo.rollout.embedded import stream_seeds
from megatron_mgrpo.rollout.servers import Server, ServerError
from megatron_mgrpo.rollout.transports import PushFailed, Transport, _each
from megatron_mgrpo.rollout.base import RolloutError  # noqa: E402,F401 (raised here; re-exported)


class SGLangEngine(RolloutEngine):
    def __init__(self, groups: Dict[str, List[Server]], transport: Transport, *,
                 host_copy: bool = True, request_timeout_s: float = 600.0,
                 max_retries: int = 2, max_prompts_per_request: int = 64,
                 launch_timeout_s: float = 600.0, send_seeds: bool = True,
                 log: Callable[[str], None] = print):
        """groups: the servers of each weight set; the same list object for both sets means
        the swap placement. host_copy: keep each set's last update in host memory (always
        so for swap; for separate it lets a restarted server be brought up to date at once
        rather than at the next update). send_seeds: pass each completion's sampling_seed."""
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
        info = s.call("/get_server_info", timeout=self.request_timeout_s)
        s.tp_size = int(info.get("tp_size") or 1)
        s.holds = s.call("/get_weight_version", timeout=self.request_timeout_s).get(
            "weight_version")

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
            s.process.stop()
            try:
                s.process.start()
                s.wait_healthy(self.launch_timeout_s)
                self._introduce(s)
                return
            except (ServerError, OSError) as e:
                why = e
        elif s.healthy():
            return
        self.log(f"rollout: dropping {s.url} ({why})")
        self.stats["dropped"] += 1
        s.alive = False

    def close(self) -> None:
        self.transport.close()
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
        """Mark the servers partial, send, confirm, check: afterwards each holds `tag`."""
        def begin(s):
            s.holds = None
            _optional(s, "/pause_generation")
            s.call("/update_weight_version", protocol.version_request(tag + protocol.PARTIAL))

        def confirm(s):
            s.call("/update_weight_version", protocol.version_request(tag),
                   self.transport.timeout_s)
            _optional(s, "/flush_cache")
            _optional(s, "/continue_generation")
            got = s.call("/get_weight_version").get("weight_version")
            if got != tag:
                raise WeightUpdateError(f"{s.url} reports weight version {got!r} after the "
                                        f"update to {tag!r}")
            s.holds = tag

        _each(servers, begin)
        self.transport.send(servers, source, tag)
        _each(servers, confirm)
        self.stats["loads"] += len(servers)

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
            raise fatal[0]
        missing = sum(c is None for c in out)
        if missing:
            raise RolloutError(f"generate({model}): {missing} of {len(out)} completions "
                               "could not be made by the servers left; no partial batch")
        return [out[i * n:(i + 1) * n] for i in range(len(prompts))]


class _Stale(RuntimeError):
    """A server answered with weights other than the set's current version."""


def _optional(s: Server, path: str) -> None:
    """An endpoint older SGLang versions lack; our calls never overlap generation anyway."""
    try:
        s.call(path, {})
    except ServerError as e:
        if e.status not in (400, 404, 405, 422):
            raise


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
                         os.path.join(run_dir, "server_logs"), g.launch_timeout_s)
        policy, momentum = servers[:g.launch], servers[g.launch:]
    else:
        policy, momentum = [Server(u) for u in g.urls], [Server(u) for u in g.momentum_urls]
        for s in policy + momentum:
            s.wait_healthy(g.launch_timeout_s)
    groups = {"policy": policy, "momentum": momentum if g.placement == "separate" else policy}
    backend = g.dist_backend if g.dist_backend != "auto" else (
        "nccl" if torch.cuda.is_available() else "gloo")
    transport = make_transport(g.transport, bucket_bytes,
                               g.disk_dir or os.path.join(run_dir, "pushed_weights"),
                               hf_config, backend, g.dist_master_address, g.request_timeout_s)
    return SGLangEngine(groups, transport, host_copy=g.host_copy,
                        request_timeout_s=g.request_timeout_s, max_retries=g.max_retries,
                        max_prompts_per_request=g.max_prompts_per_request,
                        launch_timeout_s=g.launch_timeout_s, log=log)

