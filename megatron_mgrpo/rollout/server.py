"""An HTTP server that speaks SGLang 0.5.23's protocol on top of the embedded engine.

    mgrpo serve --model HF_DIR [--host 127.0.0.1] [--port 30000]

It stands in for `python -m sglang.launch_server` where SGLang cannot run (CPU machines, CI):
the SGLang client is exercised over real HTTP, and the disaggregated layout (trainer here,
rollout servers there) runs on a laptop. Like an SGLang server it holds one model; the client
decides whether that is the policy or the momentum model.

Routes and replies as SGLang 0.5.23's (`sglang.srt.entrypoints.http_server`): GET /health,
/health_generate, /model_info, /get_model_info, /server_info, /get_server_info;
GET|POST /flush_cache (text; 400 while requests run), /release_memory_occupation,
/resume_memory_occupation; POST|PUT /generate (`server_requests` says what it honours);
POST /begin_weight_update, /end_weight_update, /update_weights_from_tensor (inside a session;
plain pairs, verl's `LocalSerializedTensor` values or `load_format: "flattened_bucket"`),
/update_weights_from_disk, /init_weights_update_group, /update_weights_from_distributed (inside
a session), /destroy_weights_update_group, /update_weight_version, /abort_request,
/pause_generation, /continue_generation; the OpenAI API: GET /v1/models, POST /v1/completions,
/v1/chat/completions (`server_openai`). Errors: 404 `{"detail": "Not Found"}`; a malformed
body 400 in SGLang's `ErrorResponse` shape; a refused generation 400 `{"error": {"message"}}`
(/v1/*: `ErrorResponse`); a refused weight call 400 `{"success": false, "message"}`.
`stream: true` sends an event per token as it is generated (`server_stream`).

Where it differs, on purpose:
- tensor payloads are unpickled with an exact allowlist of tensors, storages and dtypes
  (`protocol.TensorUnpickler`), shared memory by name only (CPU);
- a weight version that ends in ":partial" marks an update under way; confirming a final
  version with /update_weight_version fails unless the update covered every parameter;
- requests run one batch at a time (one request's items together); /health_generate answers
  at once while a generation makes progress, as SGLang's does while it runs something;
- a released model (/release_memory_occupation) refuses /generate until resumed, and its
  weights are gone after /resume_memory_occupation (zeroed) until a load, as a GPU server's
  are undefined.
"""

from __future__ import annotations

import glob
import os
import socket
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from megatron_mgrpo.rollout import protocol
from megatron_mgrpo.rollout.base import SamplingParams, WeightUpdateError
from megatron_mgrpo.rollout.embedded import EmbeddedEngine
from megatron_mgrpo.rollout.server_http import (Reply, body_field, disconnected, handler,
                                               json_object)
from megatron_mgrpo.rollout.server_openai import openai_routes
from megatron_mgrpo.rollout.server_requests import (GenerateRequest, Invalid, Refused,
                                                    parse_generate)
from megatron_mgrpo.rollout.server_stream import Emit, Rows, generate_stream

MODEL = "policy"  # the engine's one weight set
SGLANG_VERSION = "0.5.23"
"""The SGLang whose HTTP contract this server follows (reported in /server_info)."""
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")


def _fail(message: str) -> Reply:
    return Reply(400, {"success": False, "message": message})


class EmbeddedServer:
    """The engine behind an HTTP listener; `start()` serves from a thread, `serve_forever()`
    from this one."""

    def __init__(self, engine: EmbeddedEngine, host: str = "127.0.0.1", port: int = 0,
                 model_path: str = "", weight_version: str = "default", tokenizer=None):
        self.engine = engine
        self.model_path = model_path
        self.weight_version = weight_version
        self.tokenizer = tokenizer
        cfg = engine.config
        self.context_len = int(getattr(cfg, "max_position_embeddings", None) or 2 ** 31)
        eos = getattr(cfg, "eos_token_id", None)
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos_ids = [int(t) for t in eos if 0 <= int(t) < cfg.vocab_size]
        self._lock = threading.RLock()  # one generation or weight load at a time
        self._state = threading.Lock()  # the bookkeeping below
        self._resumed = threading.Event()
        self._resumed.set()
        self._running: Dict[str, threading.Event] = {}  # rid -> its cancel flag
        self._progress = 0.0  # monotonic time of the last decoding step
        self._session = False
        self._released: set = set()
        self._partial_names: Optional[set] = None
        self._groups: Dict[str, Any] = {}
        self._http = ThreadingHTTPServer((host, port), handler(self.routes()))
        self._http.daemon_threads = True
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "EmbeddedServer":
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._http.serve_forever()

    def stop(self) -> None:
        self.abort_all()
        self._http.shutdown()
        self._http.server_close()

    # ---- routes -----------------------------------------------------------------------------

    def routes(self) -> Dict[Tuple[str, str], Callable[[Any, Any], Any]]:
        r: Dict[Tuple[str, str], Callable] = {}
        for m in ("GET",):
            r[(m, "/health")] = lambda b, h: Reply(200, "", text=True)
            r[(m, "/health_generate")] = self.health_generate
            r[(m, "/model_info")] = r[(m, "/get_model_info")] = lambda b, h: self.model_info()
            r[(m, "/server_info")] = r[(m, "/get_server_info")] = lambda b, h: self.server_info()
        for m in ("GET", "POST"):
            r[(m, "/flush_cache")] = self.flush_cache
            r[(m, "/release_memory_occupation")] = self.release
            r[(m, "/resume_memory_occupation")] = self.resume_memory
        for m in ("POST", "PUT"):
            r[(m, "/generate")] = self.generate
        post = {"/begin_weight_update": self.begin_session,
                "/end_weight_update": self.end_session,
                "/update_weights_from_tensor": self.update_from_tensor,
                "/update_weights_from_disk": self.update_from_disk,
                "/init_weights_update_group": self.init_group,
                "/update_weights_from_distributed": self.update_from_distributed,
                "/destroy_weights_update_group": self.destroy_group,
                "/update_weight_version": self.update_version,
                "/abort_request": self.abort_request,
                "/pause_generation": self.pause, "/continue_generation": self.resume}
        for path, fn in post.items():
            r[("POST", path)] = fn
        r.update(openai_routes(self))
        return r

    def model_info(self) -> dict:
        cfg = self.engine.config
        return {"model_path": self.model_path, "served_model_name": self.model_path,
                "tokenizer_path": self.model_path if self.tokenizer is not None else None,
                "is_generation": True, "preferred_sampling_params": None,
                "weight_version": self.weight_version, "load_format": "auto",
                "reasoning_parser": None, "tool_call_parser": None,
                "disaggregation_mode": "null", "has_image_understanding": False,
                "has_audio_understanding": False,
                "model_type": getattr(cfg, "model_type", None),
                "architectures": getattr(cfg, "architectures", None)}

    def server_info(self) -> dict:
        return {"model_path": self.model_path, "tokenizer_path": self.model_path,
                "tp_size": 1, "dp_size": 1, "pp_size": 1, "context_length": self.context_len,
                "skip_tokenizer_init": self.tokenizer is None, "dtype": str(
                    self.engine.dtype).replace("torch.", ""),
                "internal_states": [{"running_requests": len(self._running)}],
                "version": SGLANG_VERSION, "frontend": "mgrpo serve"}

    # ---- generation -------------------------------------------------------------------------

    def generate(self, body: Any, handler) -> Any:
        req = parse_generate(body, self.tokenizer, self.engine.config.vocab_size,
                             self.context_len, self.eos_ids)
        batch = not req.single or req.sampling.n > 1
        if not req.stream:
            items = self.run(req, handler)
            return items if batch else items[0]
        self.refuse_if_released()  # a refusal is a 400 before the stream starts
        return generate_stream(self.run, req, handler, batch)

    def refuse_if_released(self) -> None:
        if self._released:
            raise Refused("the model's memory is released (/release_memory_occupation); "
                          "call /resume_memory_occupation and load weights first")

    def run(self, req: GenerateRequest, handler, emit: Optional[Emit] = None) -> list:
        """Generate for a parsed request: its reply items, prompt-major (each prompt's n
        together). `emit(row, item)`, when given, gets each row's items as its tokens come
        (`server_stream`). Stops early when the client goes away or the request is aborted."""
        self.refuse_if_released()
        n = req.sampling.n
        prompts = [p for p in req.prompts for _ in range(n)]  # SGLang's order: prompt-major
        seeds = [s for s in req.sampling.seeds for _ in range(n)]
        rids = [r if n == 1 else f"{r}_{j}" for r in req.rid for j in range(n)]
        rows = Rows(req, prompts, rids, self.tokenizer, emit)
        cancel = threading.Event()
        with self._state:
            for r in req.rid:
                self._running[r] = cancel
        conn = getattr(handler, "connection", None)

        def should_stop() -> bool:
            self._progress = time.monotonic()
            if not cancel.is_set() and conn is not None and disconnected(conn):
                cancel.set()  # the client went away: stop working for it
            return cancel.is_set()

        try:
            self._resumed.wait()
            with self._lock:
                rows.version = self.weight_version
                self._progress = time.monotonic()
                done = self.engine.generate_rows(
                    prompts, seeds, req.sampling.params, MODEL, should_stop=should_stop,
                    on_step=rows.on_step if rows.watching else None)
        except ValueError as e:
            raise Refused(str(e)) from None
        finally:
            with self._state:
                for r in req.rid:
                    self._running.pop(r, None)
        return [rows.finish(i, c) for i, c in enumerate(done)]

    def health_generate(self, body, handler) -> Reply:
        """200 at once while a generation makes progress (as SGLang: any output counts);
        otherwise one greedy token; 503 when that does not come within 20 s."""
        if self._running and time.monotonic() - self._progress < 20.0:
            return Reply(200, "", text=True)
        if self._released:
            return Reply(503, "", text=True)
        if not self._lock.acquire(timeout=20.0):
            return Reply(503, "", text=True)
        try:
            self.engine.generate_rows([[0]], [0], SamplingParams(temperature=0.0,
                                                                 max_new_tokens=1), MODEL)
        finally:
            self._lock.release()
        return Reply(200, "", text=True)

    def abort_all(self) -> None:
        with self._state:
            for ev in self._running.values():
                ev.set()

    def abort_request(self, body, handler) -> Reply:
        body = json_object(body)
        rid = body_field(body, "rid", (str,), None)
        abort_all = body_field(body, "abort_all", (bool,), False)
        with self._state:
            for r, ev in self._running.items():
                if abort_all or r == rid:
                    ev.set()
        return Reply(200, "", text=True)

    def flush_cache(self, body, handler) -> Reply:
        # No prefix cache here; what a caller can observe is SGLang's refusal while busy.
        if self._running:
            return Reply(400, "Flush cache failed: there are running or waiting requests.\n",
                         text=True)
        return Reply(200, "Cache flushed.\nPlease check backend logs for more details. "
                     "(When there are running or waiting requests, the operation will not "
                     "be performed.)\n", text=True)

    def pause(self, body, handler) -> dict:
        body = json_object(body)
        mode = body_field(body, "mode", (str,), "abort")
        if mode not in ("abort", "retract", "in_place"):
            raise Invalid(f"mode: expected abort | retract | in_place, got {mode!r}")
        self._resumed.clear()
        if mode == "abort":
            self.abort_all()
        with self._lock:  # in-flight generations end first
            pass
        return {"message": "Generation paused successfully.", "status": "ok"}

    def resume(self, body, handler) -> dict:
        json_object(body)
        self._resumed.set()
        return {"message": "Generation continued successfully.", "status": "ok"}

    # ---- memory -----------------------------------------------------------------------------

    def _tags(self, body) -> list:
        body = json_object(body)
        tags = body_field(body, "tags", (list,), None) or list(MEMORY_TAGS)
        if not all(t in MEMORY_TAGS for t in tags):
            raise Invalid(f"tags: expected a list of {' | '.join(MEMORY_TAGS)}, got {tags!r}")
        return tags

    def release(self, body, handler) -> Reply:
        tags = self._tags(body)
        if self._running:
            return Reply(400, {"error": {"message": "release_memory_occupation should be "
                                                    "called only when server is idle."}})
        with self._lock:
            self._released.update(tags)
        return Reply(200, None)

    def resume_memory(self, body, handler) -> Reply:
        tags = self._tags(body)
        missing = [t for t in tags if t not in self._released]
        if missing:
            return Reply(400, {"error": {"message": f"{missing[0]} is not released"}})
        with self._lock:
            if "weights" in tags:  # the memory comes back, its contents do not
                with torch.no_grad():
                    for p in self.engine.hf_model(MODEL).parameters():
                        p.zero_()
            self._released.difference_update(tags)
        return Reply(200, None)

    # ---- weights ----------------------------------------------------------------------------

    def begin_session(self, body, handler) -> dict:
        json_object(body)
        with self._lock:
            if self._session:
                raise _fail("a weight-update session is already open; call "
                            "end_weight_update() first")
            self._session = True
        return {"success": True, "message": "Success"}

    def end_session(self, body, handler) -> dict:
        json_object(body)
        with self._lock:
            if not self._session:
                raise _fail("no weight-update session is open; call begin_weight_update() "
                            "first")
            self._session = False
        return {"success": True, "message": "Success"}

    def _load(self, named, body: dict, route: str) -> dict:
        """Load one bucket of a (possibly partial) update; stamp the request's version."""
        version = body.get("weight_version")
        with self._lock:
            if not self._session:
                raise _fail(f"{route} must run between begin_weight_update() and "
                            "end_weight_update()")
            if "weights" in self._released:
                raise _fail("the weights' memory is released; /resume_memory_occupation "
                            "first")
            if version is not None and version.endswith(protocol.PARTIAL):
                if self._partial_names is None or self.weight_version != version:
                    self._partial_names = set()  # a new partial update starts
                seen = self._partial_names
            else:
                seen = set()
            try:
                self.engine.load_tensors(MODEL, named, seen)
            except WeightUpdateError as e:
                self.weight_version = version if version and version.endswith(
                    protocol.PARTIAL) else self.weight_version + protocol.PARTIAL
                raise _fail(str(e)) from None
            if body.get("flush_cache", True) and self._running:
                raise _fail("Weights were updated, but the cache was not flushed because "
                            "requests are still running or queued. Retract or finish them, "
                            "then call /flush_cache.")
            if version is not None:
                self.weight_version = version
        return {"success": True, "message": "Success" + (
            f" Weight version updated to {version}." if version is not None else "")}

    def _update_body(self, body, required: Dict[str, tuple]) -> dict:
        body = json_object(body)
        for key, kinds in required.items():
            if key not in body:
                raise Invalid(f"{key}: field required")
            body_field(body, key, kinds, None)
        body_field(body, "weight_version", (str,), None)
        body_field(body, "flush_cache", (bool,), True)
        if body_field(body, "abort_all_requests", (bool,), False):
            self.abort_all()
        return body

    def update_from_tensor(self, body, handler) -> dict:
        body = self._update_body(body, {"serialized_named_tensors": (list,)})
        payloads = body["serialized_named_tensors"]
        fmt = body_field(body, "load_format", (str,), None)
        if not payloads or not all(isinstance(p, str) for p in payloads):
            raise Invalid("serialized_named_tensors: expected one base64 string per TP rank")
        if fmt not in (None, "direct", "flattened_bucket"):
            raise _fail(f"load_format {fmt!r} is not supported here (None, direct, "
                        "flattened_bucket)")
        if not self._session:  # refused before anything is unpickled
            raise _fail("update_weights_from_tensor must run between begin_weight_update() "
                        "and end_weight_update()")
        try:  # TP size 1: rank 0's payload is the whole bucket
            named = protocol.deserialize_named_tensors(payloads[0], fmt)
        except Exception as e:  # noqa: BLE001 - any undecodable payload is the client's fault
            raise _fail(f"serialized_named_tensors: {type(e).__name__}: {e}") from None
        return self._load(named, body, "update_weights_from_tensor")

    def update_from_disk(self, body, handler) -> dict:
        from megatron_mgrpo.weights.safetensors_io import read_header, read_tensor

        body = self._update_body(body, {"model_path": (str,)})
        path = body["model_path"]
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise Reply(400, {"success": False, "num_paused_requests": 0,
                              "message": f"update_weights_from_disk: no *.safetensors in "
                                         f"{path!r}"})
        seen: set = set()
        with self._lock:
            self.weight_version += "" if self.weight_version.endswith(protocol.PARTIAL) \
                else protocol.PARTIAL
            try:
                for file in files:
                    header, start = read_header(file)
                    with open(file, "rb") as f:
                        named = [(n, read_tensor(f, e, start)) for n, e in header.items()
                                 if n != "__metadata__"]
                    self.engine.load_tensors(MODEL, named, seen)
                self.engine.check_covered(MODEL, seen)
            except (WeightUpdateError, ValueError, OSError) as e:
                raise Reply(400, {"success": False, "num_paused_requests": 0,
                                  "message": f"update_weights_from_disk({path}): {e}"}
                            ) from None
            self._released.discard("weights")
            # As SGLang: the version moves only when the request names one.
            self.weight_version = body.get("weight_version") or \
                self.weight_version[:-len(protocol.PARTIAL)]
            self._partial_names = None
        return {"success": True, "message": "Succeeded to update model weights.",
                "num_paused_requests": 0}

    def init_group(self, body, handler) -> dict:
        body = self._update_body(body, {"master_address": (str,), "master_port": (int,),
                                        "rank_offset": (int,), "world_size": (int,)})
        name = body_field(body, "group_name", (str,), "weight_update_group")
        backend = body_field(body, "backend", (str,), "nccl")
        try:
            self._groups[name] = protocol.init_weight_update_group(
                backend, body["master_address"], body["master_port"], body["rank_offset"],
                body["world_size"], name)
        except (RuntimeError, ValueError) as e:
            raise _fail(f"Failed to init group: {type(e).__name__}: {e}") from None
        return {"success": True, "message": "Succeeded to initialize custom process group."}

    def update_from_distributed(self, body, handler) -> dict:
        import torch.distributed as dist

        body = self._update_body(body, {"names": (list,), "dtypes": (list,),
                                        "shapes": (list,)})
        group = self._groups.get(body_field(body, "group_name", (str,), "weight_update_group"))
        names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
        if not (len(names) == len(dtypes) == len(shapes)):
            raise Invalid("names, dtypes and shapes must have the same length")
        try:
            specs = [(str(n), protocol.dtype_from_name(d), [int(x) for x in s])
                     for n, d, s in zip(names, dtypes, shapes)]
        except (TypeError, ValueError) as e:
            raise Invalid(f"names, dtypes, shapes: {e}") from None
        if group is None:
            raise _fail("update_weights_from_distributed: no such group; call "
                        "/init_weights_update_group first")
        if not self._session:  # the sender is told before it broadcasts into nothing
            raise _fail("update_weights_from_distributed must run between "
                        "begin_weight_update() and end_weight_update()")
        named = []
        for name, dt, shape in specs:  # received in the request's order
            t = torch.empty(shape, dtype=dt)
            dist.broadcast(protocol.wire_view(t, group), group=group, group_src=0)
            named.append((name, t))
        return self._load(named, body, "update_weights_from_distributed")

    def destroy_group(self, body, handler) -> dict:
        import torch.distributed as dist

        body = json_object(body)
        group = self._groups.pop(body_field(body, "group_name", (str,), "weight_update_group"),
                                 None)
        if group is None:
            raise _fail("no such group")
        dist.destroy_process_group(group)
        return {"success": True, "message": "Succeeded to destroy custom process group."}

    def update_version(self, body, handler) -> dict:
        body = json_object(body)
        if "new_version" not in body:
            raise Invalid("new_version: field required")
        new = body_field(body, "new_version", (str,), None)
        if body_field(body, "abort_all_requests", (bool,), True):
            self.abort_all()
        with self._lock:
            if new.endswith(protocol.PARTIAL):  # the client opens an update
                self._partial_names = set()
            elif self._partial_names is not None:
                try:
                    self.engine.check_covered(MODEL, self._partial_names)
                except WeightUpdateError as e:
                    raise _fail(f"Failed to update weight version: cannot stamp {new!r}: {e}"
                                ) from None
                self._partial_names = None
            self.weight_version = new
        return {"success": True, "message": f"Weight version updated to {new}",
                "new_version": new}


class CannotListen(OSError):
    """`mgrpo serve`'s address is taken (or not this host's)."""


def load_tokenizer(model: str):
    """The model directory's own tokenizer, or None when it has none (token ids only)."""
    if not any(os.path.exists(os.path.join(model, f)) for f in (
            "tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    except Exception:  # noqa: BLE001 - a directory without a usable tokenizer serves ids
        return None
    _restore_tokenizer_json_components(tok, os.path.join(model, "tokenizer.json"))
    return tok


def _restore_tokenizer_json_components(tok, path: str) -> None:
    """transformers 5 rebuilds a tokenizer class's pre-tokenizer and decoder (Qwen2's, say)
    over tokenizer.json's; SGLang puts tokenizer.json's back where their kinds differ
    (`hf_transformers/tokenizer.py::_fix_v5_tokenizer_components`), and so tokenises as
    the file says. So does this server, to count and cut the same tokens."""
    backend = getattr(tok, "_tokenizer", None)
    if backend is None or not os.path.exists(path):
        return
    from tokenizers import Tokenizer

    try:
        raw = Tokenizer.from_file(path)
    except Exception:  # noqa: BLE001 - as SGLang: keep what transformers built
        return
    if raw.pre_tokenizer is not None and backend.pre_tokenizer is not None and \
            type(raw.pre_tokenizer) is not type(backend.pre_tokenizer):
        backend.pre_tokenizer, backend.decoder = raw.pre_tokenizer, raw.decoder


def serve(model: str, host: str = "127.0.0.1", port: int = 30000, dtype: str = "float32",
          weight_version: str = "default", seed: Optional[int] = None) -> None:
    """`mgrpo serve`: load the HF model dir and serve until interrupted. CannotListen when
    the address cannot be bound (checked before the model loads)."""
    try:  # a busy port fails now, not after loading the model
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        raise CannotListen(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    engine = EmbeddedEngine.from_pretrained(model, dtype=getattr(torch, dtype), sets=(MODEL,),
                                            seed=seed, num_threads=1)
    server = EmbeddedServer(engine, host, port, model_path=model,
                            weight_version=weight_version, tokenizer=load_tokenizer(model))
    print(f"mgrpo serve: {model} on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
