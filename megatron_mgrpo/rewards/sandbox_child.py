"""The sandbox's child side: the bootstrap that runs inside the sandboxed interpreter.

`sandbox.run_python` starts `python -I -B sandbox_child.py SETUP_FD REPORT_FD` in the run's work
directory. This file reads its setup (JSON: the program, its limits, uid, work directory) from
SETUP_FD, isolates itself (namespaces, mounts, resource limits, uid), installs the audit hooks,
reports what took effect to REPORT_FD (JSON lines), and `exec`s the program as `__main__`. The
threat model and the isolation layers are described in `sandbox.py`.

It is run by path under `-I` (not even its own directory is on `sys.path`), so it imports nothing
but the standard library.
"""

# Kept on purpose: the program is compiled with the flags of this file (`_run_program`), so this
# is part of the environment programs have always run in.
from __future__ import annotations

import ctypes
import json
import linecache
import math
import os
import re
import resource
import sys
import traceback
import types
from typing import Optional, Tuple

# Linux constants from <sched.h>, <sys/mount.h>, <linux/prctl.h> and <linux/capability.h>.
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1 << 14, 1 << 18, 1 << 21, 1 << 24
# Flags a remount must repeat: inside a user namespace they are locked and dropping one fails.
_MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
                "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME,
                "strictatime": MS_STRICTATIME}
PR_SET_KEEPCAPS, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 8, 38, 47, 2
CAP_DAC_READ_SEARCH, _CAPABILITY_VERSION_3 = 2, 0x20080522
# Exit code of a run whose sandbox could not be set up (the reason goes to the report).
_SETUP_FAILED = 121

_AF_UNIX = 1
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_WRITABLE_FILES = ("/dev/null",)
# Audit events that change the file system: event -> ((path arg, dir_fd arg or None), ...).
_PATH_EVENTS = {
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),),
    "os.rename": ((0, 2), (1, 3)), "os.link": ((0, 2), (1, 3)), "os.symlink": ((1, 2),),
    "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.utime": ((0, 3),),
    "os.truncate": ((0, None),), "os.setxattr": ((0, None),), "os.removexattr": ((0, None),),
    "shutil.rmtree": ((0, 1),),
}
_LOOKUP_EVENTS = ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
                  "socket.gethostbyaddr", "socket.getnameinfo")
_SOCKET_EVENTS = ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg")
_EXEC_EVENTS = ("os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen")


def _child_main(setup_fd: int, report_fd: int) -> None:
    config = json.loads(os.read(setup_fd, os.fstat(setup_fd).st_size))
    os.close(setup_fd)
    os.set_inheritable(report_fd, False)

    def report(**entry):
        os.write(report_fd, (json.dumps(dict(entry, pid=os.getpid())) + "\n").encode())

    try:
        isolation, writable = _isolate(config)
    except (OSError, ValueError) as e:
        report(setup_error=str(e))
        os._exit(_SETUP_FAILED)
    userns = os.stat("/proc/self/ns/user").st_ino if "userns" in isolation else None
    report(isolation=isolation, userns=userns)
    allow_network = config["limits"]["allow_network"]
    # Hooks do not follow exec: other programs may run only where the kernel fences them.
    fenced = "mountns" in isolation and (allow_network or "netns" in isolation)
    _install_guards(writable, block_network=not allow_network, block_exec=not fenced,
                    guard_kill=config["uid"] is None,
                    keep_session=config["uid"] is None and userns is None, userns=userns)
    _run_program(config["code"], report)


def _isolate(config: dict) -> Tuple[list, list]:
    """Namespaces, limits and identity of this process, in the only order that works: user
    namespace first (it grants the rights for the rest), mounts while still privileged, limits,
    then the uid drop. Returns the names of what took effect and the directories the program
    may write in."""
    libc = ctypes.CDLL(None, use_errno=True)
    limits, uid, workdir = config["limits"], config["uid"], config["workdir"]
    done = ["uid"] if uid is not None else []
    writable = [workdir]

    def unshare(flag):
        return limits["use_namespaces"] and libc.unshare(flag) == 0

    if uid is None and unshare(CLONE_NEWUSER):
        real_uid, real_gid = os.getuid(), os.getgid()
        for name, text in (("setgroups", "deny"), ("uid_map", f"{real_uid} {real_uid} 1"),
                           ("gid_map", f"{real_gid} {real_gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        done.append("userns")
    if not limits["allow_network"] and unshare(CLONE_NEWNET):
        done.append("netns")
    if unshare(CLONE_NEWNS):
        shm = _private_tmpfs(libc, "/dev/shm", limits["max_file_mb"])
        writable += ["/dev/shm"] if shm else []
        if _mounts_read_only(libc, writable):
            done.append("mountns")
    os.chdir(workdir)
    # RLIMIT_NPROC counts per user namespace only since Linux 5.14.
    own_count = uid is not None or ("userns" in done and _kernel_at_least(5, 14))
    nproc = limits["max_processes"] if own_count else config["nproc_fallback"]
    cpu = max(1, math.ceil(limits["cpu_time_s"]))
    mib = 1 << 20
    for res, soft, hard in ((resource.RLIMIT_CPU, cpu, cpu + 1),
                            (resource.RLIMIT_AS, limits["memory_mb"] * mib, None),
                            (resource.RLIMIT_FSIZE, limits["max_file_mb"] * mib, None),
                            (resource.RLIMIT_NPROC, nproc, None),
                            (resource.RLIMIT_NOFILE, limits["max_open_files"], None),
                            (resource.RLIMIT_CORE, 0, None)):
        _lower_limit(res, soft, soft if hard is None else hard)
    if uid is not None:
        _become(libc, uid, config["grant_read"])
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    return done, writable


def _mount_call(libc):
    mount = libc.mount
    mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                      ctypes.c_void_p]
    return mount


def _private_tmpfs(libc, path: str, size_mb: int) -> bool:
    """A fresh tmpfs over `path` in this mount namespace; it vanishes with the namespace.
    /dev/shm gets one because multiprocessing's locks and queues need a writable /dev/shm."""
    options = f"mode=1777,size={size_mb}m".encode()
    return os.path.isdir(path) and _mount_call(libc)(
        b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options) == 0


def _mounts_read_only(libc, writable: list) -> bool:
    """In a fresh mount namespace: bind the work directory (`writable[0]`) onto itself, then
    remount every mount read-only but those at `writable`. False when any writable mount could
    not be (then the audit hooks guard)."""
    mount, workdir = _mount_call(libc), writable[0]
    if mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return False
    if mount(workdir.encode(), workdir.encode(), None, MS_BIND, None) != 0:
        return False
    with open("/proc/self/mountinfo") as f:
        entries = [line.split() for line in f]
    complete = True
    for fields in entries:
        target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        options = fields[5].split(",")
        if target in writable or "ro" in options:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for option in options:
            flags |= _MOUNT_FLAGS.get(option, 0)
        if mount(None, target.encode(), None, flags, None) != 0:
            complete = False
    return complete


def _become(libc, uid: int, grant_read: bool) -> None:
    """Drop root for `uid`, keeping CAP_DAC_READ_SEARCH (also across exec, as an ambient
    capability) when the interpreter is unreadable to others."""
    if grant_read and libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if grant_read:
        bit = 1 << CAP_DAC_READ_SEARCH
        header = (ctypes.c_uint32 * 2)(_CAPABILITY_VERSION_3, 0)
        data = (ctypes.c_uint32 * 6)(bit, bit, bit, 0, 0, 0)  # effective, permitted, inheritable
        if (libc.capset(header, data) != 0 or libc.prctl(
                PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_DAC_READ_SEARCH, 0, 0) != 0):
            raise OSError(ctypes.get_errno(), "capset(CAP_DAC_READ_SEARCH)")


def _lower_limit(res: int, soft: int, hard: int) -> None:
    _, current = resource.getrlimit(res)
    if current != resource.RLIM_INFINITY:
        soft, hard = min(soft, current), min(hard, current)
    resource.setrlimit(res, (soft, hard))


def _kernel_at_least(major: int, minor: int) -> bool:
    found = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return found is not None and (int(found.group(1)), int(found.group(2))) >= (major, minor)


def _install_guards(writable: list, block_network: bool, block_exec: bool, guard_kill: bool,
                    keep_session: bool, userns: Optional[int]) -> None:
    """Audit hooks refusing, with PermissionError, what the program may not do. `guard_kill`:
    signals only to the run's own processes, its session or user namespace `userns` (the run
    shares the caller's uid); `keep_session`: no new sessions or groups, since cleanup then
    finds the run's processes by session."""
    roots = [os.path.realpath(path) for path in writable]

    def inside(path, dir_fd=None) -> bool:
        if isinstance(path, int):
            return True  # an already open descriptor
        path = os.fsdecode(path)
        if dir_fd not in (None, -1) and not os.path.isabs(path):
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        real = os.path.realpath(path)
        return real in _WRITABLE_FILES or any(
            real == root or real.startswith(root + os.sep) for root in roots)

    def ours(pid: int) -> bool:
        try:
            return pid == 0 or (pid > 0 and (os.getsid(pid) == os.getsid(0) or (
                userns is not None and os.stat(f"/proc/{pid}/ns/user").st_ino == userns)))
        except OSError:
            return False

    def hook(event, args):
        if event == "open":
            flags = args[2] if isinstance(args[2], int) else 0
            if flags & _WRITE_FLAGS and not inside(args[0]):
                raise PermissionError(f"sandbox: no writing outside the work directory: {args[0]}")
        elif event in _PATH_EVENTS:
            for path_at, dir_fd_at in _PATH_EVENTS[event]:
                dir_fd = None if dir_fd_at is None else args[dir_fd_at]
                if not inside(args[path_at], dir_fd):
                    raise PermissionError(f"sandbox: {event} outside the work directory: "
                                          f"{args[path_at]}")
        elif block_network and event.startswith("socket."):
            if event in _LOOKUP_EVENTS or (event == "socket.__new__" and args[1] not in (
                    -1, _AF_UNIX)) or (event in _SOCKET_EVENTS and not _local_unix(args, inside)):
                raise PermissionError(f"sandbox: no network ({event})")
        elif block_exec and event in _EXEC_EVENTS:
            raise PermissionError(f"sandbox: running other programs is disabled here ({event})")
        elif guard_kill and event in ("os.kill", "os.killpg") and not ours(abs(args[0])):
            raise PermissionError(f"sandbox: {event} outside the sandbox")

    sys.addaudithook(hook)
    if keep_session:
        def refuse(*_):
            raise PermissionError("sandbox: new sessions and process groups are disabled")
        os.setsid = os.setpgrp = os.setpgid = refuse


def _local_unix(args, inside) -> bool:
    """A Unix socket, addressed (if at all) by a path inside the work directory, not by an
    abstract name."""
    sock, address = args[0], args[1]
    if getattr(sock, "family", None) != _AF_UNIX:
        return False
    if address is None:
        return True  # sendmsg on a connected socket, e.g. a socketpair
    return (isinstance(address, (str, bytes)) and address[:1] not in ("\0", b"\0")
            and inside(address))


def _run_program(code: str, report) -> None:
    """`exec` the program as `__main__`; an uncaught exception prints its traceback (without
    this frame) and exits 1, as plain `python solution.py` would."""
    filename = "solution.py"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    sys.argv = [filename]
    # A module of its own, as runpy does: pickle (multiprocessing) finds the program's functions
    # as `__main__.name`, where this bootstrap would otherwise stand.
    main = types.ModuleType("__main__")
    sys.modules["_sandbox_bootstrap"] = sys.modules["__main__"]
    sys.modules["__main__"] = main
    try:
        exec(compile(code, filename, "exec"), main.__dict__)
    except SystemExit:
        raise
    except BaseException as e:  # the program's failure, reported as Python would
        if isinstance(e, MemoryError):
            main.__dict__.clear()  # free the hoard, so that reporting has memory to work with
        report(exception=type(e).__name__, message=str(e)[:300])
        try:
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # without this frame
        except MemoryError:
            sys.stderr.write(f"{type(e).__name__}: {e}\n")
        sys.exit(1)


if __name__ == "__main__":
    _child_main(int(sys.argv[1]), int(sys.argv[2]))
