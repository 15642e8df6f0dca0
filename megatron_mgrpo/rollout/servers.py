"""Rollout servers as the client sees them: a URL, JSON over HTTP, and the process if we launched
it (so that a dead or hung one can be killed and started again on the same port)."""

from __future__ import annotations

import atexit
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any, List, Optional

from megatron_mgrpo.parallel import free_port


class ServerError(RuntimeError):
    """A server that did not answer, answered late, or answered with an HTTP error."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status
        """The HTTP status when the server answered (a refusal), None when it did not."""


class Server:
    """One rollout server (an SGLang server or `mgrpo serve`)."""

    def __init__(self, url: str, process: Optional["ServerProcess"] = None):
        self.url = url.rstrip("/")
        self.process = process
        self.holds: Optional[str] = None
        """The weight version the server was last confirmed to hold (None: unknown or an
        update broke off)."""
        self.alive = True
        """False once it failed and could not be brought back; dropped from the pool."""
        self.tp_size = 1

    def __repr__(self) -> str:
        return f"Server({self.url})"

    def call(self, path: str, body: Optional[dict] = None, timeout: float = 60.0,
             method: Optional[str] = None) -> Any:
        """JSON request, JSON answer. ServerError on no answer in `timeout` s or a non-2xx."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data,
                                     method=method or ("GET" if body is None else "POST"),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise ServerError(f"{self.url}{path}: HTTP {e.code}: {detail}", e.code) from None
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise ServerError(f"{self.url}{path}: no answer ({type(reason).__name__}: "
                              f"{reason})") from None
        try:
            return json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            raise ServerError(f"{self.url}{path}: not JSON: {raw[:200]!r}") from None

    def healthy(self, timeout: float = 5.0) -> bool:
        try:
            self.call("/health", timeout=timeout)
            return True
        except ServerError:
            return False

    def wait_healthy(self, timeout: float) -> None:
        """Poll /health until it answers; ServerError after `timeout` s, or at once if our
        process exited (with the tail of its log)."""
        proc = self.process
        log = f"; its log: {proc.log_path}\n{_tail(proc.log_path)}" if proc else ""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.popen is not None and proc.popen.poll() is not None:
                raise ServerError(f"{self.url}: the server exited with code "
                                  f"{proc.popen.returncode} while starting{log}")
            if self.healthy(timeout=2.0):
                return
            time.sleep(0.2)
        raise ServerError(f"{self.url}: not healthy after {timeout:.0f} s{log}")


class ServerProcess:
    """A server we launched: `command` is a template with {host}, {port} and {model}."""

    def __init__(self, command: str, host: str, port: int, model: str, log_path: str):
        self.argv = [a.format(host=host, port=port, model=model, python=sys.executable)
                     for a in shlex.split(command)]
        self.url = f"http://{host}:{port}"
        self.log_path = log_path
        self.popen: Optional[subprocess.Popen] = None

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.log_path) or ".", exist_ok=True)
        log = open(self.log_path, "ab")
        # Its own session: stopping it takes its children (SGLang's schedulers) along.
        self.popen = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        log.close()
        atexit.register(self.stop)  # a crashed trainer must not leave servers behind

    def stop(self) -> None:
        atexit.unregister(self.stop)
        if self.popen is None or self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(timeout=30)


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def launch(command: str, count: int, host: str, base_port: int, model: str, log_dir: str,
           timeout: float) -> List[Server]:
    """Start `count` servers on consecutive ports from `base_port` (0: free ports) and wait
    until all answer /health; on any failure stop the ones started and raise."""
    servers = []
    try:
        for i in range(count):
            port = base_port + i if base_port else free_port(host)
            proc = ServerProcess(command, host, port, model,
                                 os.path.join(log_dir, f"server_{port}.log"))
            proc.start()
            servers.append(Server(proc.url, proc))
        for s in servers:
            s.wait_healthy(timeout)
    except BaseException:
        for s in servers:
            s.process.stop()
        raise
    return servers
