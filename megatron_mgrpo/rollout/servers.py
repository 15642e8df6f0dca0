"""Rollout servers as the client sees them: a URL, JSON over HTTP, and the process if we launched
it (so that a dead or hung one can be killed and started again on the same port).

Waits say what they wait for: a request still unanswered after `PROGRESS_S` logs a line (the
URL, the route, how long) and again every `PROGRESS_S`; so does waiting for a server to come
up, which ends in one line at its timeout. A launched server runs in its own process group
(its own session), which is killed whole by `stop()`, by the engine's `close()` and at
interpreter exit, so that no server outlives the trainer.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, List, Optional

from megatron_mgrpo.parallel import free_port
from megatron_mgrpo.rollout.base import RolloutError

PROGRESS_S = 20.0
"""Seconds between the lines a long wait prints."""


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class ServerError(RolloutError):
    """A server that did not answer, answered late, or answered with an HTTP error."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status
        """The HTTP status when the server answered (a refusal), None when it did not."""


class Server:
    """One rollout server (an SGLang server or `mgrpo serve`)."""

    def __init__(self, url: str, process: Optional["ServerProcess"] = None,
                 log: Callable[[str], None] = _stderr):
        self.url = url.rstrip("/")
        self.process = process
        self.log = log
        """Where the lines of long waits go (the engine sets its own)."""
        self.holds: Optional[str] = None
        """The weight version the server was last confirmed to hold (None: unknown or an
        update broke off)."""
        self.alive = True
        """False once it failed and could not be brought back; dropped from the pool."""
        self.tp_size = 1
        self.version: tuple = ()
        """SGLang's version as the server reports it in /server_info (() if it does not)."""
        self.released = False
        """Its memory (weights, KV cache) was released; resume before the next load."""

    def __repr__(self) -> str:
        return f"Server({self.url})"

    def call(self, path: str, body: Optional[dict] = None, timeout: float = 60.0,
             method: Optional[str] = None) -> Any:
        """JSON request; the answer as JSON, or as text where the server answers text
        (SGLang's /flush_cache). ServerError on no answer in `timeout` s or a non-2xx. A
        request unanswered after PROGRESS_S says so in the log, and again every PROGRESS_S."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data,
                                     method=method or ("GET" if body is None else "POST"),
                                     headers={"Content-Type": "application/json"})
        done = threading.Event()
        if timeout > PROGRESS_S:
            threading.Thread(target=self._say_while_waiting, args=(path, timeout, done),
                             daemon=True).start()
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = " ".join(e.read().decode(errors="replace").split())[:300]
            raise ServerError(f"{self.url}{path}: HTTP {e.code}: {detail}", e.code) from None
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise ServerError(f"{self.url}{path}: no answer ({type(reason).__name__}: "
                              f"{reason})") from None
        finally:
            done.set()
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return raw.decode(errors="replace")

    def _say_while_waiting(self, path: str, timeout: float, done: threading.Event) -> None:
        start = time.monotonic()
        while not done.wait(PROGRESS_S):
            self.log(f"rollout: still waiting for {self.url}{path}: no answer for "
                     f"{time.monotonic() - start:.0f} s (gives up after {timeout:.0f} s, "
                     "sglang.request_timeout_s)")

    def healthy(self, timeout: float = 5.0) -> bool:
        try:
            self.call("/health", timeout=timeout)
            return True
        except ServerError:
            return False

    def wait_healthy(self, timeout: float) -> None:
        """Poll /health until it answers, saying every PROGRESS_S what it waits for; a
        one-line ServerError after `timeout` s, or at once if our process exited (naming its
        log and the log's last line)."""
        proc = self.process
        start = time.monotonic()
        said, last = start, "nothing tried yet"
        while True:
            if proc is not None and proc.popen is not None and proc.popen.poll() is not None:
                raise ServerError(f"{self.url}: the server exited with code "
                                  f"{proc.popen.returncode} while starting; its log: "
                                  f"{proc.log_path} (last line: {_tail(proc.log_path)!r})")
            try:
                self.call("/health", timeout=2.0)
                return
            except ServerError as e:
                last = str(e).split(": ", 1)[-1]
            now = time.monotonic()
            if now - start >= timeout:
                where = f"; its log: {proc.log_path}" if proc else ""
                raise ServerError(f"{self.url}: not healthy after {timeout:.0f} s "
                                  f"(sglang.launch_timeout_s); last: {last}{where}")
            if now - said >= PROGRESS_S:
                said = now
                self.log(f"rollout: waiting for {self.url}/health: {last} "
                         f"({now - start:.0f} s of {timeout:.0f} s)")
            time.sleep(min(0.2, max(0.0, start + timeout - now)))


class ServerProcess:
    """A server we launched: `command` is a template with {host}, {port} and {model}."""

    def __init__(self, command: str, host: str, port: int, model: str, log_path: str):
        self.argv = [a.format(host=host, port=port, model=model, python=sys.executable)
                     for a in shlex.split(command)]
        self.url = f"http://{host}:{port}"
        self.log_path = log_path
        self.popen: Optional[subprocess.Popen] = None

    def start(self) -> None:
        _check_runnable(self.argv)
        os.makedirs(os.path.dirname(self.log_path) or ".", exist_ok=True)
        log = open(self.log_path, "ab")
        # Its own session, hence its own process group: stopping it takes its children
        # (SGLang's schedulers and detokenizer) along.
        try:
            self.popen = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        except OSError as e:
            raise RolloutError(f"sglang.launch_command: cannot start {self.argv[0]!r}: "
                               f"{e.strerror or e}") from None
        finally:
            log.close()
        atexit.register(self.stop)  # a trainer that exits any other way leaves none behind

    def stop(self, grace: float = 5.0) -> None:
        """Kill the server's whole process group: SIGTERM, SIGKILL after `grace` s (0: at
        once, for a server that failed)."""
        atexit.unregister(self.stop)
        if self.popen is None:
            return
        steps = ((signal.SIGTERM, grace),) if grace > 0 else ()
        for sig, wait in steps + ((signal.SIGKILL, 30.0),):
            try:
                os.killpg(self.popen.pid, sig)  # the group: also children of an exited leader
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.popen.wait(timeout=wait)
                if sig == signal.SIGTERM:  # the leader is gone: make sure its group is too
                    os.killpg(self.popen.pid, signal.SIGKILL)
                return
            except subprocess.TimeoutExpired:
                continue
            except (ProcessLookupError, PermissionError):
                return


def _check_runnable(argv: List[str]) -> None:
    """One line instead of a server that dies at once: `python -m sglang...` where this
    Python has no SGLang."""
    if len(argv) >= 3 and argv[1] == "-m" and argv[2].split(".")[0] == "sglang" and \
            os.path.realpath(argv[0]) == os.path.realpath(sys.executable) and \
            importlib.util.find_spec("sglang") is None:
        raise RolloutError(
            "sglang.launch: SGLang is not installed in this Python (pip install "
            "'sglang==0.5.23' on a GPU machine); on CPU set sglang.launch_command to "
            "'{python} -m megatron_mgrpo.cli serve --model {model} --host {host} "
            "--port {port}', or attach to running servers with sglang.urls")


def _tail(path: str) -> str:
    """The last non-empty line of a log file ("" if none)."""
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f.readlines()[-50:] if line.strip()]
        return lines[-1][:300] if lines else ""
    except OSError:
        return ""


def launch(command: str, count: int, host: str, base_port: int, model: str, log_dir: str,
           timeout: float, log: Callable[[str], None] = _stderr) -> List[Server]:
    """Start `count` servers on consecutive ports from `base_port` (0: free ports) and wait
    until all answer /health; on any failure stop the ones started and raise."""
    servers = []
    try:
        for i in range(count):
            port = base_port + i if base_port else free_port(host)
            proc = ServerProcess(command, host, port, model,
                                 os.path.join(log_dir, f"server_{port}.log"))
            proc.start()
            servers.append(Server(proc.url, proc, log))
        for s in servers:
            s.wait_healthy(timeout)
    except BaseException:
        for s in servers:
            s.process.stop(grace=0)
        raise
    return servers
