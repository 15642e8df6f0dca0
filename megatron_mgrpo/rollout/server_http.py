"""`mgrpo serve`'s HTTP layer: routing, bodies, and replies in SGLang 0.5.23's shapes (404
`{"detail": "Not Found"}`, 405, a malformed body 400 as SGLang's `ErrorResponse`, a refused
request 400 `{"error": {"message"}}`), on the standard library's threading HTTP server."""

from __future__ import annotations

import json
import select
import socket
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, Dict, Tuple
from urllib.parse import parse_qs

from megatron_mgrpo.rollout.server_requests import Invalid, Refused


class Reply(Exception):
    """Answer with this status and body (JSON, or text when `text`)."""

    def __init__(self, status: int, body: Any, text: bool = False):
        super().__init__(str(body))
        self.status, self.body, self.text = status, body, text


def json_object(body) -> dict:
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise Invalid("the body must be a JSON object")
    return body


def body_field(body: dict, key: str, kinds: tuple, default):
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise Invalid(f"{key}: expected {' or '.join(k.__name__ for k in kinds)}, "
                      f"got {value!r}")
    return value


def disconnected(conn: socket.socket) -> bool:
    """The client closed its end (readable with nothing to read)."""
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        return bool(readable) and conn.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def handler(routes: Dict[Tuple[str, str], Callable]):
    """A request handler class serving `routes` ((method, path) -> fn(body, handler))."""
    paths = {p for _, p in routes}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: the client reports what matters
            pass

        def _serve(self, method: str) -> None:
            path, _, query = self.path.partition("?")
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            route = routes.get((method, path))
            if route is None:
                code, detail = (405, "Method Not Allowed") if path in paths else \
                    (404, "Not Found")
                return self._reply(code, {"detail": detail})
            try:
                try:
                    body = json.loads(raw) if raw.strip() else None
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise Invalid(f"JSON decode error: {e}") from None
                if body is None and query:
                    body = {k: v[-1] for k, v in parse_qs(query).items()}
                    body.pop("timeout", None)
                out = route(body, self)
                if isinstance(out, Reply):
                    return self._reply(out.status, out.body, out.text)
                return self._reply(200, out)
            except Reply as r:
                return self._reply(r.status, r.body, r.text)
            except Invalid as e:
                return self._reply(400, {"object": "error", "message": str(e),
                                         "type": "Bad Request", "param": None, "code": 400})
            except Refused as e:
                return self._reply(400, {"error": {"message": str(e)}})
            except Exception as e:  # noqa: BLE001 - a 500 with the reason beats a dropped socket
                return self._reply(500, {"error": {"message": f"{type(e).__name__}: {e}"}})

        def _reply(self, code: int, obj: Any, text: bool = False) -> None:
            if text:
                data = str(obj).encode()
                kind = "text/event-stream" if str(obj).startswith("data: ") else \
                    "text/plain; charset=utf-8"
            else:
                data, kind = json.dumps(obj).encode(), "application/json"
            try:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client is gone (it disconnected, or an aborted request)

        def do_GET(self):
            self._serve("GET")

        def do_POST(self):
            self._serve("POST")

        def do_PUT(self):
            self._serve("PUT")

    return Handler
