"""`mgrpo serve`'s HTTP layer: routing, bodies, and replies in SGLang 0.5.23's shapes (404
`{"detail": "Not Found"}`, 405, a malformed body 400 as SGLang's `ErrorResponse`, a refused
request 400 `{"error": {"message"}}`, server-sent events in chunks as they are produced), on
the standard library's threading HTTP server."""

from __future__ import annotations

import json
import queue
import select
import socket
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, Dict, Optional, Tuple
from urllib.parse import parse_qs

from megatron_mgrpo.rollout.server_requests import Invalid, Refused


class Reply(Exception):
    """Answer with this status and body (JSON, or text when `text`)."""

    def __init__(self, status: int, body: Any, text: bool = False):
        super().__init__(str(body))
        self.status, self.body, self.text = status, body, text


class Stream:
    """A 200 `text/event-stream` reply sent as it is produced: `produce(send)` runs in the
    request's thread and calls `send(event)` per event (a JSON object, or a string sent as
    is); `data: [DONE]` ends it. A slow reader never holds `produce` up: a writer thread
    sends what is queued. A client that goes away is for `produce` to notice
    (`disconnected`): sends after that are dropped."""

    def __init__(self, produce: Callable[[Callable[[Any], None]], None]):
        self.produce = produce


def sse(event: Any) -> bytes:
    text = event if isinstance(event, str) else json.dumps(event, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


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
                if isinstance(out, Stream):
                    return self._stream(out)
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

        def _stream(self, stream: Stream) -> None:
            try:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream; charset=utf-8")  # as SGLang
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
            except OSError:
                pass  # gone already: `produce` finds out and stops
            chunks: "queue.SimpleQueue[Optional[bytes]]" = queue.SimpleQueue()
            writer = threading.Thread(target=self._write_chunks, args=(chunks,), daemon=True)
            writer.start()
            try:
                stream.produce(lambda event: chunks.put(sse(event)))
            except Exception as e:  # noqa: BLE001 - headers are out: the error is an event
                chunks.put(sse({"error": {"message": f"{type(e).__name__}: {e}",
                                          "type": "InternalServerError", "code": 500}}))
            finally:
                chunks.put(sse("[DONE]"))
                chunks.put(None)
                writer.join()

        def _write_chunks(self, chunks) -> None:
            alive = True
            while (data := chunks.get()) is not None:
                alive = alive and self._send_chunk(data)
            if alive:
                self._send_chunk(b"")  # the last chunk: the reply is complete

        def _send_chunk(self, data: bytes) -> bool:
            try:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                return True
            except OSError:
                self.close_connection = True
                return False

        def do_GET(self):
            self._serve("GET")

        def do_POST(self):
            self._serve("POST")

        def do_PUT(self):
            self._serve("PUT")

    return Handler
