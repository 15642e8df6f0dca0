"""The code sandbox against real hostile programs: each is contained, reported as a failure with
a reason, and leaves no process, no work directory and no file outside behind."""

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

from megatron_mgrpo.rewards import sandbox
from megatron_mgrpo.rewards.sandbox import SandboxLimits, run_python, run_tests, same_output
from tests import DEADLOCK_GUARD_S


def _leftovers(workdir):
    """Live processes that ran in `workdir`: by their working directory or by the TMPDIR every
    sandboxed process inherits (either survives a chdir or an exec)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                    continue
            cwd = os.readlink(f"/proc/{name}/cwd")
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if cwd.startswith(workdir) or f"TMPDIR={workdir}".encode() in environ:
            found.append(int(name))
    return found


def _assert_clean(result):
    assert not os.path.exists(result.workdir), "work directory left behind"
    assert _leftovers(result.workdir) == [], "sandboxed processes survived"


def test_stdin_round_trip_and_clean_exit():
    r = run_python("s = input()\nprint(s[::-1])\nopen('scratch.txt', 'w').write(s)\n",
                   stdin="hello\n")
    assert (r.status, r.returncode, r.stdout, r.reason) == ("ok", 0, "olleh\n", "")
    assert r.ok and not r.stdout_truncated and not r.stderr_truncated
    assert "rlimits" in r.isolation and "audit" in r.isolation
    _assert_clean(r)


def test_large_stdin_does_not_deadlock():
    r = run_python("import sys\nprint(len(sys.stdin.read()))", stdin="7" * 5_000_000)
    assert (r.status, r.stdout) == ("ok", "5000000\n")


def test_exit_code_is_propagated():
    r = run_python("import sys\nprint('partial')\nsys.exit(3)")
    assert (r.status, r.returncode, r.stdout) == ("error", 3, "partial\n")
    assert "code 3" in r.reason
    _assert_clean(r)


def test_exception_gives_error_with_traceback():
    r = run_python("def f(x):\n    return 1 / x\nf(0)\n")
    assert (r.status, r.returncode) == ("error", 1)
    assert "Traceback" in r.stderr and 'File "solution.py", line 2' in r.stderr
    assert "return 1 / x" in r.stderr and r.stderr.rstrip().endswith("division by zero")
    assert "ZeroDivisionError: division by zero" in r.reason
    syntax = run_python("print(")
    assert syntax.status == "error" and "SyntaxError" in syntax.reason
    _assert_clean(r)


def test_sleeping_program_hits_the_wall_limit():
    # 3 s: on a loaded machine an interpreter can take over a second to print its first line.
    r = run_python("import time\nprint('started', flush=True)\ntime.sleep(60)", timeout_s=3)
    assert (r.status, r.returncode) == ("timeout", -9)
    assert "wall time limit" in r.reason and r.stdout == "started\n"
    assert 3.0 <= r.wall_s < 15
    _assert_clean(r)


def test_cpu_bound_loop_hits_the_cpu_limit():
    r = run_python("while True:\n    pass", limits=SandboxLimits(cpu_time_s=1, wall_time_s=30))
    assert r.status == "timeout" and "CPU time limit" in r.reason, r
    assert r.cpu_s >= 0.9 and r.wall_s < 15
    _assert_clean(r)


@pytest.mark.parametrize("code", [
    # The plain bomb: the program dies when fork first fails.
    "import os\nwhile True:\n    os.fork()\n",
    # The stubborn one: every copy ignores failures, leaves the process group and keeps forking.
    textwrap.dedent("""\
        import os
        while True:
            try:
                if os.fork() == 0:
                    try:
                        os.setsid()
                    except OSError:
                        pass
            except OSError:
                pass
    """),
])
def test_fork_bomb_is_contained(code):
    r = run_python(code, timeout_s=2, limits=SandboxLimits(max_processes=8))
    assert r.status in ("error", "timeout") and r.reason
    assert r.wall_s < 8
    _assert_clean(r)


def test_memory_hog_reports_memory():
    limits = SandboxLimits(memory_mb=256)
    at_once = run_python("block = bytearray(1 << 30)", limits=limits)
    assert at_once.status == "memory" and "256 MiB" in at_once.reason
    gradual = run_python("hoard = []\nwhile True:\n    hoard.append(bytearray(1 << 20))",
                         limits=limits)
    assert gradual.status == "memory" and "MemoryError" in gradual.stderr
    _assert_clean(gradual)


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


def _assert_no_connection(server):
    time.sleep(0.2)
    with pytest.raises(BlockingIOError):
        server.accept()


def test_network_connection_is_refused(listener):
    port = listener.getsockname()[1]
    r = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)")
    assert r.status == "error" and r.reason
    # A program started from inside runs without the audit hooks: the kernel must stop it.
    child = (f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=3); "
             f"print('connected')")
    r2 = run_python(f"import subprocess, sys\n"
                    f"print(subprocess.run([sys.executable, '-c', {child!r}]).returncode)")
    # Refused either by the network namespace (the child fails) or, without one, at exec.
    assert "connected" not in r2.stdout and (r2.stdout.strip() not in ("", "0")
                                             or r2.status == "error"), r2
    _assert_no_connection(listener)
    _assert_clean(r)


def test_network_can_be_allowed_explicitly(listener):
    port = listener.getsockname()[1]
    r = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)",
                   limits=SandboxLimits(allow_network=True))
    assert r.status == "ok", r
    conn, _ = listener.accept()
    conn.close()


def test_writes_outside_the_workdir_are_refused(tmp_path):
    # World-writable targets, so that only the sandbox stands between the program and them.
    open_dir = tempfile.mkdtemp(prefix="sandbox-target-")
    os.chmod(open_dir, 0o777)
    os.chmod(tmp_path, 0o777)
    targets = [str(tmp_path / "escape.txt"), os.path.join(open_dir, "escape.txt")]
    code = textwrap.dedent(f"""\
        import os, subprocess
        open("inside.txt", "w").write("fine")
        for target in {targets!r}:
            for attempt in (lambda: open(target, "w").write("x"),
                            lambda: os.mkdir(target + ".d"),
                            lambda: os.symlink("/etc/passwd", target + ".ln")):
                try:
                    attempt()
                    print("escaped", target)
                except OSError as e:
                    print("refused", type(e).__name__)
            try:  # a shell does not run the audit hooks
                subprocess.run(["sh", "-c", "echo x > " + target + ".sh"])
            except OSError as e:
                print("refused", type(e).__name__)
        open({targets[0]!r}, "w")
    """)
    try:
        r = run_python(code)
        assert r.status == "error" and "outside the work directory" in r.reason, r
        assert "escaped" not in r.stdout and r.stdout.count("refused") >= 6
        assert os.listdir(tmp_path) == [] and os.listdir(open_dir) == []
        _assert_clean(r)
    finally:
        shutil.rmtree(open_dir)


def test_huge_print_is_capped_quickly():
    limits = SandboxLimits(max_output_bytes=1 << 20)
    r = run_python("import sys\nsys.stdout.write('x' * 100_000_000)", limits=limits)
    assert r.status == "killed" and "stdout exceeded" in r.reason
    assert r.stdout_truncated and not r.stderr_truncated and r.stdout == "x" * (1 << 20)
    assert r.wall_s < 15  # killed at the cap, not after 100 MB (bounds loose for busy CPUs)
    endless = run_python("while True:\n    print('y' * 1000)", limits=limits)
    assert endless.status == "killed" and endless.stdout_truncated and endless.wall_s < 15
    _assert_clean(endless)


def test_unremovable_looking_leftovers_are_removed():
    r = run_python(textwrap.dedent("""\
        import os
        os.makedirs("locked/deeper")
        open("locked/deeper/file", "w").write("x")
        os.chmod("locked/deeper/file", 0o400)
        os.chmod("locked/deeper", 0o000)
        os.chmod("locked", 0o500)
        os.mkfifo("pipe")
    """))
    assert r.status == "ok", r
    _assert_clean(r)


def test_multiprocessing_works_inside():
    r = run_python(textwrap.dedent("""\
        from multiprocessing import Pool

        def square(x):
            return x * x

        if __name__ == "__main__":
            with Pool(2) as pool:
                print(pool.map(square, range(5)))
    """))
    assert (r.status, r.stdout) == ("ok", "[0, 1, 4, 9, 16]\n"), r
    _assert_clean(r)


def test_concurrent_runs_are_separate():
    results = [None] * 4

    def one(i):
        results[i] = run_python(f"import os\nprint({i}, os.listdir('.'))\n"
                                f"open('mine', 'w').write('{i}')")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.stdout for r in results] == [f"{i} []\n" for i in range(4)]
    assert len({r.workdir for r in results}) == 4


def test_same_output_is_whitespace_tolerant():
    assert same_output("1 2\n3\n", "1 2\r\n3")
    assert same_output("  7  \n\n", "7")
    assert not same_output("1 2", "1  2")
    assert not same_output("1\n2", "12")


def test_run_tests_reports_each_case():
    code = "a, b = map(int, input().split())\nprint(a + b)"
    cases = [("1 2\n", "3\n"), ("2 2\n", "5"), ("x\n", "0")]
    results = run_tests(code, cases)
    assert [c.passed for c in results] == [True, False, False]
    assert results[0].reason == ""
    assert results[1].reason.startswith("wrong answer") and "'5'" in results[1].reason
    assert results[2].reason.startswith("error:") and "ValueError" in results[2].reason
    stopped = run_tests(code, [cases[1], cases[0]], stop_at_first_failure=True)
    assert [c.passed for c in stopped] == [False, False] and stopped[1].result is None


def _reachable_by_all(path):
    path = os.path.realpath(path)
    while path != os.path.dirname(path):
        path = os.path.dirname(path)
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
    return True


_NOBODY = 65534


@pytest.mark.parametrize("namespaces", [True, False], ids=["userns", "hooks-only"])
@pytest.mark.skipif(os.geteuid() != 0, reason="runs the unprivileged path as nobody, needs root")
def test_unprivileged_paths_contain_the_same_programs(listener, namespaces):
    """Without root the sandbox takes its other paths (a user namespace where the kernel allows,
    else limits and audit hooks alone): run the hostile programs through them as `nobody`, with
    an interpreter nobody can run."""
    python = next((p for p in (sys.executable, "/usr/bin/python3")
                   if os.path.exists(p) and _reachable_by_all(p)), None)
    source = os.path.realpath(sandbox.__file__)
    if python is None or not _reachable_by_all(source):
        pytest.skip("no interpreter or sandbox source that nobody can reach")
    port = listener.getsockname()[1]
    target = tempfile.mkdtemp(prefix="sandbox-target-")
    os.chmod(target, 0o777)
    driver = textwrap.dedent(f"""\
        import importlib.util, json, sys
        spec = importlib.util.spec_from_file_location("sandbox", {source!r})
        sb = importlib.util.module_from_spec(spec)
        sys.modules["sandbox"] = sb
        spec.loader.exec_module(sb)
        bomb = ("import os\\nwhile True:\\n    try:\\n        if os.fork() == 0:\\n"
                "            os.setsid()\\n    except OSError:\\n        pass\\n")
        programs = {{
            "bomb": (bomb, dict(max_processes=8, wall_time_s=2)),
            "net": ("import socket\\nsocket.create_connection(('127.0.0.1', {port}))", {{}}),
            "write": ("open({target!r} + '/escape.txt', 'w')", {{}}),
            "shell": ("import subprocess\\nsubprocess.run(['sh', '-c', 'echo > {target}/sh'])",
                      {{}}),
            "kill": ("import os\\nos.kill(1, 0)", {{}}),
        }}
        out = {{}}
        for name, (code, limits) in programs.items():
            limits = sb.SandboxLimits(use_namespaces={namespaces!r}, **limits)
            r = sb.run_python(code, limits=limits)
            out[name] = [r.status, r.reason, r.workdir, r.isolation]
        print(json.dumps(out))
    """)
    try:
        done = subprocess.run([python, "-I", "-c", driver], user=_NOBODY, group=_NOBODY,
                              extra_groups=[], cwd="/", capture_output=True, text=True,
                              timeout=DEADLOCK_GUARD_S)
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        assert out["bomb"][0] in ("error", "timeout")
        for name in ("net", "write", "kill"):
            assert out[name][0] == "error" and out[name][1], (name, out[name])
        for status, reason, workdir, isolation in out.values():
            assert not isolation.startswith("uid") and ("netns" in isolation) == namespaces
            assert not os.path.exists(workdir) and _leftovers(workdir) == []
        assert os.listdir(target) == []
        _assert_no_connection(listener)
    finally:
        shutil.rmtree(target)
