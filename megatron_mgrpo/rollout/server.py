"""An HTTP server that speaks SGLang's protocol on top of the embedded engine.

    mgrpo serve --model HF_DIR [--host 127.0.0.1] [--port 30000]

It stands in for `python -m sglang.launch_server` where SGLang cannot run (CPU machines, CI):
the SGLang client is exercised over real HTTP, and the disaggregated layout (trainer here,
rollout servers there) runs on a laptop. Like an SGLang server it holds one model; the client
decides whether that is the policy or the momentum model.

Endpoints (request and response fields as SGLang's): GET /health, /health_generate,
/get_model_info, /get_server_info, /get_weight_version; POST /generate,
/update_weights_from_tensor, /update_weights_from_disk, /init_weights_update_group,
/update_weights_from_distributed, /destroy_weights_update_group, /update_weight_version,
/pause_generation, /continue_generation, /flush_cache.

Beyond SGLang, for safety: a weight version that ends in ":partial" marks an update under way;
confirming a final version with /update_weight_version fails unless the partial update covered
every parameter, so a broken-off update can never be stamped complete.
"""

from __future__ import annotations

import glob
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from megatron_mgrpo.rollout import protocol
from megatron_mgrpo.rollout.base import SamplingParams, WeightUpdateError
from megatron_mgrpo.rollout.embedded import EmbeddedEngine

MODEL = "policy"  # the engine's one weight set


class BadRequest(ValueError):
    """A request the server refuses (answered 400 with the message)."""


class EmbeddedServer:
    """The engine behind an HTTP listener; `start()` serves from a thread, `serve_forever()`
    from this one."""

    def __init__(self, engine: EmbeddedEngine, host: str = "127.0.0.1", port: int = 0,
                 model_path: str = "", weight_version: str = "default"):
        self.engine = engine
        self.model_path = model_path
        self.weight_version = weight_version
        self._lock = threading.RLock()  # one generation or weight load at a time
        self._resumed = threading.Event()
        self._resumed.set()
        self._partial_names: Optional[set] = None
        self._groups: Dict[str, Any] = {}
        self._http = ThreadingHTTPServer((host, port), _handler(self))
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
        self._http.shutdown()
        self._http.server_close()

    # ---- routes -----------------------------------------------------------------------------

    def routes(self) -> Dict[Tuple[str, str], Callable[[dict], Any]]:
        return {
            ("GET", "/health"): lambda _: {},
            ("GET", "/health_generate"): self.health_generate,
            ("GET", "/get_model_info"): lambda _: {
                "model_path": self.model_path, "tokenizer_path": self.model_path,
                "is_generation": True, "weight_version": self.weight_version},
            ("GET", "/get_server_info"): lambda _: {
                "model_path": self.model_path, "tp_size": 1, "dp_size": 1,
                "weight_version": self.weight_version},
            ("GET", "/get_weight_version"): lambda _: {"weight_version": self.weight_version},
            ("POST", "/generate"): self.generate,
            ("POST", "/update_weights_from_tensor"): self.update_from_tensor,
            ("POST", "/update_weights_from_disk"): self.update_from_disk,
            ("POST", "/init_weights_update_group"): self.init_group,
            ("POST", "/update_weights_from_distributed"): self.update_from_distributed,
            ("POST", "/destroy_weights_update_group"): self.destroy_group,
            ("POST", "/update_weight_version"): self.update_version,
            ("POST", "/pause_generation"): self.pause,
            ("POST", "/continue_generation"): self.resume,
            ("POST", "/flush_cache"): lambda _: {"success": True},
            ("GET", "/flush_cache"): lambda _: {"success": True},
        }

    def generate(self, body: dict) -> list:
        prompts = body.get("input_ids")
        if not isinstance(prompts, list) or not prompts:
            raise BadRequest("/generate needs input_ids (token ids; this server has no "
                             "tokenizer)")
        single = not isinstance(prompts[0], list)
        prompts = [prompts] if single else prompts
        sampling = body.get("sampling_params") or {}
        per_item = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        if len(per_item) != len(prompts):
            raise BadRequest(f"{len(prompts)} prompts but {len(per_item)} sampling_params")
        n = int(per_item[0].get("n", 1))
        if any(int(s.get("n", 1)) != n for s in per_item):
            raise BadRequest("every item's sampling_params.n must be the same")
        first = per_item[0]
        if any({k: v for k, v in s.items() if k != "sampling_seed"}
               != {k: v for k, v in first.items() if k != "sampling_seed"} for s in per_item):
            raise BadRequest("this server takes one set of sampling parameters per request "
                             "(only sampling_seed may differ between items)")
        try:
            params = SamplingParams(
                temperature=float(first.get("temperature", 1.0)),
                top_p=float(first.get("top_p", 1.0)),
                max_new_tokens=int(first.get("max_new_tokens", 128)),
                stop_token_ids=[int(t) for t in first.get("stop_token_ids") or []])
        except (TypeError, ValueError) as e:
            raise BadRequest(f"sampling_params: {e}") from None
        # SGLang's order for n > 1: prompt-major, each prompt's n samples together.
        rows = [p for p in prompts for _ in range(n)]
        seeds = [s.get("sampling_seed") for s in per_item for _ in range(n)]
        self._resumed.wait()
        with self._lock:
            try:
                done = self.engine.generate_rows(rows, seeds, params, MODEL)
            except ValueError as e:
                raise BadRequest(str(e)) from None
            version = self.weight_version
        items = protocol.generate_response(done, version, [len(p) for p in rows])
        return items[0] if single and n == 1 else items

    def health_generate(self, _: dict) -> dict:
        with self._lock:
            self.engine.generate_rows([[0]], [0], SamplingParams(max_new_tokens=1), MODEL)
        return {}

    def _load(self, named, body: dict) -> dict:
        """Load one bucket of a (possibly partial) update; stamp the request's version."""
        version = body.get("weight_version")
        with self._lock:
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
                raise BadRequest(str(e)) from None
            if version is not None:
                self.weight_version = version
        return {"success": True, "message": f"loaded {len(named)} tensors"}

    def update_from_tensor(self, body: dict) -> dict:
        payloads = body.get("serialized_named_tensors")
        if not isinstance(payloads, list) or not payloads:
            raise BadRequest("serialized_named_tensors: expected one string per TP rank")
        if body.get("load_format") not in (None, "direct"):
            raise BadRequest(f"load_format {body.get('load_format')!r} is not supported here")
        try:  # TP size 1: rank 0's payload is the whole bucket
            named = protocol.deserialize_named_tensors(payloads[0])
        except Exception as e:  # noqa: BLE001 - any undecodable payload is the client's fault
            raise BadRequest(f"serialized_named_tensors: {type(e).__name__}: {e}") from None
        return self._load(named, body)

    def update_from_disk(self, body: dict) -> dict:
        from megatron_mgrpo.weights.safetensors_io import read_header, read_tensor

        path = body.get("model_path") or ""
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise BadRequest(f"update_weights_from_disk: no *.safetensors in {path!r}")
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
                raise BadRequest(f"update_weights_from_disk({path}): {e}") from None
            self.weight_version = body.get("weight_version") or path
            self._partial_names = None
        return {"success": True, "message": f"loaded {len(seen)} tensors from {path}",
                "num_paused_requests": 0}

    def init_group(self, body: dict) -> dict:
        try:
            name = body.get("group_name", "weight_update_group")
            self._groups[name] = protocol.init_weight_update_group(
                body.get("backend", "gloo"), body["master_address"], int(body["master_port"]),
                int(body["rank_offset"]), int(body["world_size"]), name)
        except (KeyError, RuntimeError, ValueError) as e:
            raise BadRequest(f"init_weights_update_group: {type(e).__name__}: {e}") from None
        return {"success": True, "message": f"joined {name}"}

    def update_from_distributed(self, body: dict) -> dict:
        import torch.distributed as dist

        group = self._groups.get(body.get("group_name", "weight_update_group"))
        if group is None:
            raise BadRequest("update_weights_from_distributed: no such group; call "
                             "/init_weights_update_group first")
        names, dtypes, shapes = body.get("names", []), body.get("dtypes", []), \
            body.get("shapes", [])
        if not (len(names) == len(dtypes) == len(shapes)):
            raise BadRequest("names, dtypes and shapes must have the same length")
        named = []
        for name, dt, shape in zip(names, dtypes, shapes):  # received in the request's order
            t = torch.empty(shape, dtype=protocol.dtype_from_name(dt))
            dist.broadcast(protocol.wire_view(t, group), group=group, group_src=0)
            named.append((name, t))
        return self._load(named, body)

    def destroy_group(self, body: dict) -> dict:
        import torch.distributed as dist

        group = self._groups.pop(body.get("group_name", "weight_update_group"), None)
        if group is not None:
            dist.destroy_process_group(group)
        return {"success": True, "message": ""}

    def update_version(self, body: dict) -> dict:
        new = str(body.get("new_version", ""))
        with self._lock:
            if new.endswith(protocol.PARTIAL):  # the client opens an update
                self._partial_names = set()
            elif self._partial_names is not None:
                try:
                    self.engine.check_covered(MODEL, self._partial_names)
                except WeightUpdateError as e:
                    raise BadRequest(f"cannot stamp {new!r}: {e}") from None
                self._partial_names = None
            self.weight_version = new
        return {"success": True, "new_version": new, "message": ""}

    def pause(self, _: dict) -> dict:
        self._resumed.clear()
        with self._lock:  # in-flight generations finish first
            pass
        return {"success": True}

    def resume(self, _: dict) -> dict:
        self._resumed.set()
        return {"success": True}


def _handler(server: EmbeddedServer):
    routes = server.routes()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: the client reports what matters
            pass

        def _serve(self, method: str) -> None:
            path = self.path.split("?")[0]
            route = routes.get((method, path))
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if route is None:
                return self._reply(404, {"error": {"message": f"no route {method} {path}"}})
            try:
                body = json.loads(raw) if raw else {}
                return self._reply(200, route(body))
            except (BadRequest, json.JSONDecodeError) as e:
                return self._reply(400, {"success": False, "message": str(e),
                                         "error": {"message": str(e)}})
            except Exception as e:  # noqa: BLE001 - a 500 with the reason beats a dropped socket
                return self._reply(500, {"success": False,
                                         "message": f"{type(e).__name__}: {e}"})

        def _reply(self, code: int, obj: Any) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._serve("GET")

        def do_POST(self):
            self._serve("POST")

    return Handler


def serve(model: str, host: str = "127.0.0.1", port: int = 30000, dtype: str = "float32",
          weight_version: str = "default", seed: Optional[int] = None) -> None:
    """`mgrpo serve`: load the HF model dir and serve until interrupted."""
    engine = EmbeddedEngine.from_pretrained(model, dtype=getattr(torch, dtype), sets=(MODEL,),
                                            seed=seed, num_threads=1)
    server = EmbeddedServer(engine, host, port, model_path=model,
                            weight_version=weight_version)
    print(f"mgrpo serve: {model} on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
