"""A sandbox for generated code: run one Python program in a limited, throw-away process.

`run_python(code, stdin)` runs `code` as `__main__` in a fresh interpreter and reports what
happened (`SandboxResult`); `run_tests(code, tests)` runs it once per stdin/stdout case (a
process each: simple, and slower than the code grader, `rewards/code.py`, which runs all of a
completion's tests in one `run_python` process). Neither needs the rest of the package.

Threat model. This grades code written by the policy model: buggy, sometimes runaway (infinite
loops, fork bombs, memory hogs, huge prints, stray network calls or writes), not a determined
attacker. A program that sets out to escape (ctypes, raw syscalls, kernel bugs) is out of scope;
the layers below are chosen so that the accidents are contained by the kernel, not by Python.

How one run goes. The parent (this file) makes a fresh temporary directory and starts `python
-I -B sandbox_child.py` there as a new session (its own process group), with a minimal
environment and stdin from an unlinked file. That bootstrap isolates itself, sets resource
limits, installs audit hooks, and only then `exec`s the program. The parent reads stdout and
stderr with a cap, enforces the wall-clock limit, and after the program ends, however it ends,
kills every process the program left and removes the directory.

Isolation, detected at run time (what took effect is in `SandboxResult.isolation`). On this
project's machines (Linux 6.18, root in a container) 1 and 3 take effect; 2 and 4 are the
fallbacks, which the tests exercise as user nobody.
1. Run as root (here, and in CI): each run gets its own unused uid (`_free_uid`). Root ignores
   RLIMIT_NPROC and may write anywhere; a fresh uid is counted alone by RLIMIT_NPROC, owns
   nothing but the work directory, and lets the parent kill exactly the run's processes,
   setsid() escapees included, with one `kill(-1)` sent as that uid. Where the interpreter lies
   under a private home (here /root/.pyenv, /root being 0700) the run keeps CAP_DAC_READ_SEARCH,
   and only it, also across exec, so it can read (never write) the interpreter and packages;
   it can then read any file, with no network to send it anywhere.
2. Not root, and unprivileged user namespaces work: a user namespace. Since Linux 5.14
   RLIMIT_NPROC counts processes per user namespace, so the limit is the run's own; cleanup kills
   every process in that namespace.
3. Either way, where the kernel allows it: a network namespace (only a loopback, down: nothing
   is reachable, this machine included) and a mount namespace in which every mount is remounted
   read-only except a bind mount of the work directory and a private tmpfs on /dev/shm (for
   multiprocessing's locks and queues). Both vanish with the run's last process.
4. Neither (e.g. a seccomp profile that forbids namespaces; `use_namespaces=False` forces it):
   audit hooks alone guard the network and the file system, so running other programs (exec,
   subprocess, os.system) is refused, since hooks do not follow exec; RLIMIT_NPROC is set
   relative to the user's current process count; cleanup kills the run's session, which the
   program may not leave (setsid() refused).
Always: RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_NOFILE, RLIMIT_CORE=0,
no_new_privs, and audit hooks (`sys.addaudithook`, which Python code cannot remove) refusing
sockets other than Unix ones inside the work directory, name lookups, writes, renames, removals,
links and mode changes outside the writable directories (/dev/null excepted), and, unless the run
has its own uid, signals to processes not its own. They give a clear Python error where the
kernel would refuse too, and cover what it cannot in case 4.

Output cap: a program that writes more than `max_output_bytes` to stdout or stderr is killed at
once (status `killed`, the stream's `*_truncated` flag set, its first bytes kept) rather than
drained: an expected answer is never that long, and draining would let an endless print run until
the wall limit.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional, Sequence, Tuple

__all__ = ["STATUSES", "SandboxLimits", "SandboxResult", "CaseResult", "run_python", "run_tests",
           "same_output"]

STATUSES = ("ok", "timeout", "memory", "error", "killed")


@dataclass(frozen=True)
class SandboxLimits:
    """What one run may use. Defaults suit a competitive-programming solution."""

    cpu_time_s: float = 10.0
    """CPU seconds of each process (RLIMIT_CPU, rounded up to whole seconds); past it the kernel
    ends the process -> `timeout`."""
    wall_time_s: float = 15.0
    """Seconds from start until the whole run is killed -> `timeout`. Catches programs that sleep
    or block and so never use up their CPU time."""
    memory_mb: int = 1024
    """Address space of each process (RLIMIT_AS), in MiB. Virtual, not resident: the interpreter
    itself takes about 30 MiB of it."""
    max_processes: int = 32
    """Processes and threads alive at once, the program included (RLIMIT_NPROC)."""
    max_file_mb: int = 16
    """Largest file the program may write (RLIMIT_FSIZE), in MiB."""
    max_open_files: int = 64
    """Open file descriptors per process (RLIMIT_NOFILE)."""
    max_output_bytes: int = 1 << 20
    """Bytes kept of stdout and of stderr, each; writing more kills the run -> `killed`."""
    allow_network: bool = False
    """Leave the network reachable: no network namespace and no socket hooks. Trusted code only."""
    use_namespaces: bool = True
    """Isolate with Linux namespaces where the kernel allows. False runs the fallback (limits and
    audit hooks alone) that machines without namespaces get; tests use it to reach that path."""


@dataclass(frozen=True)
class SandboxResult:
    """What a run did and why it ended."""

    status: str
    """`ok` (exit code 0), `timeout` (wall or CPU limit), `memory` (memory limit), `error` (nonzero
    exit or uncaught exception) or `killed` (a signal for another reason, e.g. the output cap)."""
    returncode: int
    """Exit code, or -N when killed by signal N (as `subprocess`)."""
    stdout: str
    """What the program printed, decoded as UTF-8 (bad bytes replaced), at most the cap."""
    stderr: str
    """Its standard error, likewise; holds the traceback of an uncaught exception."""
    reason: str
    """Why it failed, for a person: empty when `ok`."""
    wall_s: float
    """Seconds from start to the end of cleanup."""
    cpu_s: float
    """CPU seconds of the program and the children it waited for."""
    stdout_truncated: bool
    """stdout went past `max_output_bytes`; `stdout` is its beginning."""
    stderr_truncated: bool
    """stderr went past `max_output_bytes`; `stderr` is its beginning."""
    workdir: str
    """The temporary working directory it ran in; removed before this result is returned."""
    isolation: str
    """The mechanisms that took effect, e.g. `uid+netns+mountns+rlimits+audit`."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class CaseResult:
    """One stdin/stdout case of `run_tests`."""

    passed: bool
    """The program ended `ok` and printed the expected output (see `same_output`)."""
    reason: str
    """Why it failed: the sandbox's reason, or a wrong answer with both outputs' beginnings."""
    result: Optional[SandboxResult]
    """The run; None when the case was skipped after an earlier failure."""


def run_python(code: str, stdin: str = "", timeout_s: Optional[float] = None,
               limits: Optional[SandboxLimits] = None) -> SandboxResult:
    """Run `code` as a Python program fed `stdin`, inside the sandbox. `timeout_s`, when given,
    sets the wall limit and caps the CPU limit. Raises RuntimeError only when the sandbox itself
    could not be set up; everything the program does is reported in the result."""
    limits = limits or SandboxLimits()
    if timeout_s is not None:
        limits = replace(limits, wall_time_s=timeout_s,
                         cpu_time_s=min(limits.cpu_time_s, timeout_s))
    uid = _free_uid() if os.geteuid() == 0 else None
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="sandbox-"))
    try:
        if uid is not None:
            os.chown(workdir, uid, uid)
        return _run(code, stdin, limits, workdir, uid)
    finally:
        _remove_tree(workdir)


def same_output(actual: str, expected: str) -> bool:
    """LiveCodeBench's stdout comparison: equal line by line once the whole output and each
    line are stripped of surrounding whitespace."""
    def lines(s):
        return [line.strip() for line in s.strip().splitlines()]
    return lines(actual) == lines(expected)


def run_tests(code: str, tests: Sequence[Tuple[str, str]], limits: Optional[SandboxLimits] = None,
              stop_at_first_failure: bool = False) -> list:
    """Run `code` once per `(stdin, expected_stdout)` case; a `CaseResult` per case, in order.
    With `stop_at_first_failure`, cases after the first failure are not run (`result` None)."""
    results = []
    for stdin, expected in tests:
        if stop_at_first_failure and results and not results[-1].passed:
            results.append(CaseResult(False, "not run: an earlier case failed", None))
            continue
        run = run_python(code, stdin, limits=limits)
        if not run.ok:
            results.append(CaseResult(False, f"{run.status}: {run.reason}", run))
        elif same_output(run.stdout, expected):
            results.append(CaseResult(True, "", run))
        else:
            results.append(CaseResult(False, f"wrong answer: expected {_clip(expected)!r}, "
                                             f"got {_clip(run.stdout)!r}", run))
    return results


# --------------------------------------------------------------------------- parent side

# Unused uids handed to root runs: far above any real account, inside the 32-bit uid space.
_UID_BASE, _UID_SPAN = 1 << 30, 1 << 24
_MEMORY_TEXT = re.compile(r"MemoryError|Cannot allocate memory|std::bad_alloc|out of memory")
_READ_CHUNK = 1 << 16
# The bootstrap, run by path: it imports nothing but the standard library.
_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")


def _run(code: str, stdin: str, limits: SandboxLimits, workdir: str,
         uid: Optional[int]) -> SandboxResult:
    # Used only where RLIMIT_NPROC cannot count the run alone (no own uid or user namespace).
    nproc_fallback = limits.max_processes
    if uid is None:
        nproc_fallback += sum(1 for _, puid, _ in _processes() if puid == os.getuid())
    config = {"code": code, "workdir": workdir, "uid": uid, "limits": asdict(limits),
              "grant_read": uid is not None and not _interpreter_public(),
              "nproc_fallback": nproc_fallback}
    with tempfile.TemporaryFile() as setup, tempfile.TemporaryFile() as report, \
            tempfile.TemporaryFile() as stdin_file:
        setup.write(json.dumps(config).encode())
        setup.seek(0)
        stdin_file.write(stdin.encode())
        stdin_file.seek(0)
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", _CHILD, str(setup.fileno()), str(report.fileno())],
            stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir,
            env=_child_env(workdir), start_new_session=True,
            pass_fds=(setup.fileno(), report.fileno()))
        streams = [_Stream(proc.stdout, "stdout", limits.max_output_bytes),
                   _Stream(proc.stderr, "stderr", limits.max_output_bytes)]
        try:
            cause = _watch(proc, streams, start + limits.wall_time_s)
        finally:
            # Killing waits for nothing the program does; it runs however the watch ended.
            lines = _report_lines(report, proc.pid)
            _kill_all(proc.pid, uid, lines.get("userns"))
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            _drain(streams, time.monotonic() + 1.0)
        lines = _report_lines(report, proc.pid)
    if "setup_error" in lines:
        raise RuntimeError(f"sandbox setup failed: {lines['setup_error']}")
    out, err = (s.text() for s in streams)
    cpu_s = usage.ru_utime + usage.ru_stime
    status, reason = _classify(proc.returncode, cause, cpu_s, limits, lines, err)
    isolation = "+".join(lines.get("isolation", []) + ["rlimits", "audit"])
    return SandboxResult(status, proc.returncode, out, err, reason, time.monotonic() - start,
                         cpu_s, streams[0].truncated, streams[1].truncated, workdir, isolation)


class _Stream:
    """One output pipe, read without blocking; keeps its first `cap` bytes."""

    def __init__(self, pipe, name: str, cap: int):
        self.pipe, self.name, self.cap = pipe, name, cap
        self.fd = pipe.fileno()
        self.data = bytearray()
        self.truncated = False
        self.open = True
        os.set_blocking(self.fd, False)

    def read(self) -> None:
        try:
            chunk = os.read(self.fd, _READ_CHUNK)
        except BlockingIOError:
            return
        self.open = bool(chunk)
        room = self.cap - len(self.data)
        self.data += chunk[:max(room, 0)]
        self.truncated |= len(chunk) > room

    def text(self) -> str:
        self.pipe.close()
        return bytes(self.data).decode("utf-8", errors="replace")


def _poll(poller, streams, timeout_s: float) -> None:
    """Wait up to `timeout_s` for output (or the exit) and read what came. poll, not select:
    a trainer may hold more than FD_SETSIZE descriptors."""
    by_fd = {s.fd: s for s in streams}
    for fd, _ in poller.poll(timeout_s * 1000):
        stream = by_fd.get(fd)
        if stream is not None and stream.open:
            stream.read()
            if not stream.open:
                poller.unregister(fd)


def _watch(proc, streams, deadline: float) -> Optional[str]:
    """Read output until the program exits; kill its group at the deadline or when an output
    cap is exceeded. Returns what we killed it for ("wall", "stdout", "stderr") or None. The
    exited program is left unreaped, so its pid (= its group id) cannot be reused before the
    cleanup kill."""
    poller = select.poll()
    for stream in streams:
        poller.register(stream.fd, select.POLLIN)
    try:
        exit_fd = os.pidfd_open(proc.pid)  # readable at exit: no polling delay
        poller.register(exit_fd, select.POLLIN)
    except (AttributeError, OSError):
        exit_fd = None  # Linux < 5.3: look for the exit every 10 ms instead
    cause = None
    try:
        while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            now = time.monotonic()
            if cause is None and now >= deadline:
                cause = "wall"
                _killpg(proc.pid)
            _poll(poller, streams, 0.01 if cause or exit_fd is None
                  else min(max(deadline - now, 0), 1.0))
            for stream in streams:
                if stream.truncated and cause is None:
                    cause = stream.name
                    _killpg(proc.pid)
    finally:
        if exit_fd is not None:
            os.close(exit_fd)
    return cause


def _drain(streams, deadline: float) -> None:
    """Read what is left in the pipes once every writer is dead."""
    poller = select.poll()
    for stream in streams:
        if stream.open:
            poller.register(stream.fd, select.POLLIN)
    while any(s.open for s in streams) and time.monotonic() < deadline:
        _poll(poller, streams, 0.05)


def _classify(returncode: int, cause, cpu_s: float, limits: SandboxLimits, report: dict,
              stderr: str) -> Tuple[str, str]:
    cpu_limit = max(1, math.ceil(limits.cpu_time_s))
    if cause == "wall":
        return "timeout", f"wall time limit of {limits.wall_time_s:g} s exceeded"
    if cause in ("stdout", "stderr"):
        return "killed", f"{cause} exceeded {limits.max_output_bytes} bytes"
    if returncode == 0:
        return "ok", ""
    if returncode == -signal.SIGXCPU or (returncode == -signal.SIGKILL and cpu_s >= cpu_limit):
        return "timeout", f"CPU time limit of {cpu_limit} s exceeded"
    if report.get("exception") == "MemoryError" or _MEMORY_TEXT.search(stderr[-2000:]):
        return "memory", f"memory limit of {limits.memory_mb} MiB exceeded"
    if returncode < 0:
        return "killed", f"killed by {signal.Signals(-returncode).name}"
    raised = f": {report['exception']}: {report['message']}" if "exception" in report else ""
    return "error", f"exited with code {returncode}{raised}"


def _report_lines(report_file, pid: int) -> dict:
    """The bootstrap's report: JSON lines, merged. Lines of forked children are ignored."""
    merged = {}
    data = os.pread(report_file.fileno(), 1 << 20, 0)
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.pop("pid", None) == pid:
            merged.update(entry)
    return merged


def _kill_all(pid: int, uid: Optional[int], userns: Optional[int]) -> None:
    """Kill every process of the run: its process group, then by uid (root runs) or by user
    namespace and session (other runs), until none is left alive."""
    for attempt in range(50):
        _killpg(pid)
        left = [p for p, puid, sid in _processes()
                if (puid == uid if uid is not None else sid == pid or _in_userns(p, userns))]
        if not left:
            return
        if uid is None or not _kill_as(uid):
            for p in left:
                try:
                    os.kill(p, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        time.sleep(0.002 * (attempt + 1))
    raise RuntimeError(f"sandbox processes survived cleanup: {left}")


def _kill_as(uid: int) -> bool:
    """`kill(-1, SIGKILL)` sent as `uid`: every process of that uid at once, so none can fork a
    replacement between a scan and a kill. False when no shell can be run for it."""
    try:
        subprocess.run(["/bin/sh", "-c", "kill -KILL -1"], user=uid, group=uid, extra_groups=[],
                       env={}, cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=10)
        return True
    except (OSError, subprocess.SubprocessError):
        return False


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _processes():
    """(pid, real uid, session id) of every live process; zombies hold nothing and are left."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{name}/status", "rb") as f:
                uid = int(re.search(rb"\nUid:\s+(\d+)", f.read()).group(1))
        except (OSError, AttributeError, IndexError):
            continue
        if fields[0] not in (b"Z", b"X"):
            yield int(name), uid, int(fields[3])


def _in_userns(pid: int, inode: Optional[int]) -> bool:
    if inode is None:
        return False
    try:
        return os.stat(f"/proc/{pid}/ns/user").st_ino == inode
    except OSError:
        return False


def _free_uid() -> int:
    busy = {uid for _, uid, _ in _processes()}
    while True:
        uid = _UID_BASE + secrets.randbelow(_UID_SPAN)
        if uid not in busy:
            return uid


@functools.lru_cache(maxsize=None)
def _interpreter_public() -> bool:
    """Whether any user can run this interpreter and read its import path: every directory on
    the way searchable by others, and the import path's directories listable by them."""
    paths = [os.path.realpath(sys.executable)] + [p for p in sys.path if p and os.path.isdir(p)]
    for path in paths:
        path = os.path.realpath(path)
        if os.path.isdir(path) and not os.stat(path).st_mode & stat.S_IROTH:
            return False
        while path != os.path.dirname(path):
            path = os.path.dirname(path)
            if not os.stat(path).st_mode & stat.S_IXOTH:
                return False
    return True


def _child_env(workdir: str) -> dict:
    # One thread per numeric library: threads count against max_processes.
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _remove_tree(path: str) -> None:
    """Remove the work directory even where the program took away its own permissions."""
    if not os.path.lexists(path):
        return
    try:
        os.chmod(path, 0o700)
        for root, dirs, _ in os.walk(path):
            for d in dirs:
                full = os.path.join(root, d)
                if not os.path.islink(full):
                    os.chmod(full, 0o700)
    except OSError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def _clip(text: str, n: int = 200) -> str:
    return text if len(text) <= n else text[:n] + "..."
