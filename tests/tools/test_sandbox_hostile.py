"""Hostile programs against the sandbox at the strongest tier this machine reaches.

Each case has a wall-clock bound and an asserted outcome; the parent (this test process) must survive all.
"""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from align.tools.sandbox import TIERS, Sandbox, SandboxConfig, detect_isolation

# ALIGN_TEST_SANDBOX_TIER=unshare|rlimits runs the whole hostile set at a weaker tier (manual check)
PREFER = os.environ.get("ALIGN_TEST_SANDBOX_TIER", "bwrap")
TIER = detect_isolation(PREFER)
pytestmark = pytest.mark.skipif(TIER == "none", reason="no sandbox tier starts on this machine")


@pytest.fixture(scope="module")
def box():
    sb = Sandbox(SandboxConfig(timeout_s=1.5, memory_mb=512, workers=1, prefer=PREFER))
    yield sb
    sb.close()


def run_bounded(box, code, tests=None, bound_s=4.0, **kw):
    t0 = time.monotonic()
    res = box.run(code, tests, **kw)
    elapsed = time.monotonic() - t0
    assert elapsed < bound_s, f"took {elapsed:.2f}s"
    return res


def test_reports_strongest_tier(box):
    # bwrap is installed by `make setup` (Debian bubblewrap); the probe must reach it when the binary exists.
    import shutil
    import subprocess

    works = shutil.which("bwrap") and subprocess.run(
        ["bwrap", "--ro-bind", "/", "/", "--unshare-pid", "--unshare-net", "true"], capture_output=True).returncode == 0
    if works and PREFER == "bwrap":
        assert box.isolation == "bwrap"
    assert box.isolation in TIERS


def test_infinite_loop(box):
    res = run_bounded(box, "while True: pass")
    assert res.status in ("timeout", "crashed")


def test_sleep(box):
    res = run_bounded(box, "import time; time.sleep(100)")
    assert res.status == "timeout"


def test_4gb_allocation(box):
    res = run_bounded(box, "x = bytearray(4 * 1024**3)\nprint('allocated')")
    assert "allocated" not in res.stdout
    assert res.status == "error" and "MemoryError" in res.stderr


def test_fork_bomb(box):
    res = run_bounded(box, "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
                      bound_s=6)
    assert res.status in ("timeout", "crashed")
    assert run_bounded(box, "print(2+2)").stdout == "4\n"  # the worker is usable afterwards


def test_thread_bomb(box):
    code = "import threading, time\nts=[]\nwhile True:\n    t=threading.Thread(target=time.sleep, args=(100,)); t.start(); ts.append(t)"
    res = run_bounded(box, code, bound_s=6)
    assert res.status in ("error", "timeout", "crashed")
    assert res.status != "ok"


def test_double_fork_daemon_is_gone(box, tmp_path):
    # The daemon writes its pid and keeps appending a heartbeat; after the run no heartbeat may arrive.
    code = """
import os, time, sys
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        print('daemon pid', os.getpid(), flush=True)
        while True:
            print('daemon alive', flush=True)
            time.sleep(0.05)
    os._exit(0)
time.sleep(0.2)
print('parent done', flush=True)
"""
    res = run_bounded(box, code)
    assert "parent done" in res.stdout
    # a later run sees no stray process in its sandbox (PID namespace teardown / subreaper kill)
    probe = run_bounded(box, "import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")
    if box.isolation in ("bwrap", "unshare"):
        pids = eval(probe.stdout)
        assert len(pids) <= 2, pids  # the zygote (pid 1) and the probe itself
    else:  # same PID namespace as the host: the daemon's pid must be gone (killed and reaped by the subreaper)
        daemon_pid = int(res.stdout.split("daemon pid ")[1].split()[0])
        assert not os.path.exists(f"/proc/{daemon_pid}") or "Z" in open(f"/proc/{daemon_pid}/stat").read().split()[2]


def test_unbounded_printing(box):
    res = run_bounded(box, "while True: print('x' * 1000)")
    assert res.status in ("timeout", "crashed")
    assert len(res.stdout) <= box.config.max_output_bytes and res.stdout_truncated


def test_200kb_output_no_deadlock(box):
    res = run_bounded(box, "import sys\nsys.stdout.write('y' * 200_000)\nsys.stderr.write('z' * 200_000)")
    assert res.status == "ok"
    assert res.stdout == "y" * box.config.max_output_bytes and res.stdout_truncated


def test_huge_file_write(box):
    res = run_bounded(box, "f = open('big', 'wb')\nwhile True: f.write(b'0' * 1_000_000)")
    assert res.status in ("crashed", "error")  # SIGXFSZ or OSError at the file-size cap
    assert res.status != "ok"


def test_too_many_open_files(box):
    res = run_bounded(box, "fs = [open('/dev/null') for _ in range(100000)]")
    assert res.status == "error" and "Too many open files" in res.stderr


def test_read_passwd_and_parent_env(box):
    os.environ["ALIGN_SECRET_TOKEN"] = "s3cr3t"
    code = """
import os
try:
    print('PASSWD', open('/etc/passwd').read().count(':'))
except Exception as e:
    print('NOPASSWD', type(e).__name__)
print('ENV', 'ALIGN_SECRET_TOKEN' in os.environ, 's3cr3t' in repr(dict(os.environ)))
for pid in os.listdir('/proc'):
    try:
        print('PROCENV', 's3cr3t' in open(f'/proc/{pid}/environ').read())
    except Exception:
        pass
"""
    res = run_bounded(box, code)
    assert "ENV False False" in res.stdout
    assert "PROCENV True" not in res.stdout
    if box.isolation == "bwrap":
        assert "NOPASSWD" in res.stdout


def test_connect_to_loopback(box):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    accepted = []
    srv.settimeout(1.5)

    def accept():
        try:
            accepted.append(srv.accept())
        except OSError:
            pass

    th = threading.Thread(target=accept)
    th.start()
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('CONNECTED')"
    res = run_bounded(box, code)
    th.join()
    srv.close()
    if box.isolation in ("bwrap", "unshare"):
        assert "CONNECTED" not in res.stdout and not accepted
        assert res.status == "error"


def test_kill_parent(box):
    code = "import os, signal\nfor p in (os.getppid(), 1, %d):\n    try: os.kill(p, signal.SIGKILL)\n    except Exception as e: print(type(e).__name__)" % os.getpid()
    res = run_bounded(box, code)
    assert res.status in ("ok", "error")
    assert run_bounded(box, "print('still here')").stdout == "still here\n"


@pytest.mark.parametrize("chain", [
    "import os; os.system('echo PWNED > {target}; cat /etc/hostname')",
    "import posix; posix.system('echo PWNED > {target}')",
    "import importlib, os; os = importlib.reload(os); os.system('echo PWNED > {target}')",
    "import subprocess; print(subprocess.run(['sh', '-c', 'echo PWNED > {target}; id -u'], capture_output=True))",
])
def test_system_chains_stay_inside(box, chain, tmp_path):
    # blanking os.system is not the defence: the shell runs, but inside the same walls. The target is in a
    # directory of the test's user (0755): bwrap hides it; as root the program runs under another uid.
    tmp_path.chmod(0o755)
    target = tmp_path / "pwned"
    res = run_bounded(box, chain.format(target=target))
    assert res.status in ("ok", "error", "crashed")
    if box.isolation == "bwrap" or os.geteuid() == 0:
        assert not target.exists()


def test_sys_exit_before_failing_asserts(box):
    res = run_bounded(box, "def f(): return 1", ["import sys; sys.exit(0)", "assert f() == 2", "assert f() == 3"])
    assert res.passed == 0 and res.failed == 3 and res.status == "failed"
    res = run_bounded(box, "import os\nos._exit(0)\ndef f(): return 1", ["assert f() == 1"])
    assert res.passed == 0 and res.status == "failed"


def test_forged_passed_output(box):
    code = "import os\nprint('PASSED 3/3'); os.write(3, b'deadbeef test 0 1 null\\n'); os.write(1, b'test 0 1 null\\n')"
    res = run_bounded(box, code, ["assert False", "assert 1 == 2"])
    assert res.passed == 0 and res.failed == 2


def test_input_gets_eof(box):
    res = run_bounded(box, "x = input()")
    assert res.status == "error" and "EOFError" in res.stderr


def test_deep_recursion(box):
    res = run_bounded(box, "def r(n): return r(n + 1)\nr(0)")
    assert res.status == "error" and "RecursionError" in res.stderr


def test_segfault(box):
    res = run_bounded(box, "import ctypes; ctypes.string_at(0)")
    assert res.status == "crashed" and res.signal == 11


def test_non_utf8_output(box):
    res = run_bounded(box, "import sys; sys.stdout.buffer.write(b'\\xff\\xfeok\\x80'); sys.stdout.flush()")
    assert res.status == "ok" and "ok" in res.stdout and "\\xff" in res.stdout


def test_per_test_results_and_timeout(box):
    res = run_bounded(box, "def f(x): return x * 2",
                      ["assert f(2) == 4", "assert f(2) == 5", "while True: pass", "assert f(3) == 6"],
                      per_test_timeout_s=0.3)
    assert [t.ok for t in res.tests] == [True, False, False, True]
    assert res.tests[2].error == "timed out"


def test_a_cpu_time_kill_is_a_timeout_like_the_wall_clock_one(box):
    # RLIMIT_CPU equals the run's timeout, so a busy loop under light load can hit it a moment before the wall
    # clock does (CI saw "crashed" for a timed-out program); SIGXCPU stands for that kill here, deterministically
    res = run_bounded(box, "import os, signal\ndef f(x): return x\nos.kill(os.getpid(), signal.SIGXCPU)",
                      ["assert f(1) == 1"])
    assert res.status == "timeout" and res.signal == 24
    assert [t.error for t in res.tests] == ["timed out"]


@pytest.mark.parametrize("tier", ["rlimits", "unshare"])
def test_weaker_tiers_still_grade_and_clean_up(tier):
    if detect_isolation(tier) != tier:
        pytest.skip(f"{tier} tier unavailable here")
    sb = Sandbox(SandboxConfig(timeout_s=1.0, prefer=tier, workers=1))
    try:
        assert sb.isolation == tier
        res = sb.run("import sys\ndef f(): return 1\nsys.exit(0)", ["assert f() == 2"])
        assert res.passed == 0 and res.failed == 1
        res = sb.run("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\nprint('ok')")
        assert res.stdout == "ok\n"
        assert sb.run("while True: pass").status in ("timeout", "crashed")
        assert sb.run("print(1)", []).stdout == "1\n"
    finally:
        sb.close()


def test_min_isolation_is_enforced(monkeypatch):
    import align.tools.sandbox as sbx

    monkeypatch.setitem(sbx._tier_cache, "bwrap", "rlimits")
    with pytest.raises(sbx.SandboxUnavailableError, match="min_isolation='bwrap'"):
        Sandbox(SandboxConfig(min_isolation="bwrap"))
    with pytest.raises(ValueError, match="weaker than min_isolation"):
        SandboxConfig(min_isolation="bwrap", prefer="unshare")


def test_workers_outlive_short_lived_threads_and_dead_workers_are_replaced():
    sb = Sandbox(SandboxConfig(timeout_s=2.0, workers=1, prefer=PREFER))
    try:
        out = []
        th = threading.Thread(target=lambda: out.append(sb.run("print(1)")))
        th.start()
        th.join()
        time.sleep(0.2)  # a parent-death signal tied to that thread would have fired by now
        assert out[0].stdout == "1\n" and sb.run("print(2)").stdout == "2\n"
        worker = sb._idle.get()
        worker.proc.kill()  # the worker dies while idle (OOM killer, operator): replaced, not an error
        worker.proc.wait()
        sb._idle.put(worker)
        res = sb.run("print(3)")
        assert res.status == "ok" and res.stdout == "3\n"
    finally:
        sb.close()
