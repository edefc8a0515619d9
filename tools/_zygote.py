"""Warm pre-forked interpreter that runs untrusted Python, one program at a time.

This file is a standalone stdlib-only script: `align.tools.sandbox` starts it once per worker (inside bwrap /
unshare when available) and then sends it requests over stdin/stdout (4-byte big-endian length + JSON).
For each request it forks a fresh child that drops privileges, sets rlimits, starts a new session, runs
the program and then each test separately, and reports per-test results on a private pipe tagged with a
random token (so printed "passed" text or an early `sys.exit(0)` cannot forge a pass). The zygote reads
stdout / stderr / results concurrently with caps, kills the child's process group at the deadline and,
when it is PID 1 of its own PID namespace, kills every other process in the namespace after each run
(double-forked daemons included).

The harness shares the interpreter with the program, so a program can find the token and write result
lines itself. Tests graded "outside" (`tools/grading.py`) do not depend on the token: only a test's
expression comes in, only its value goes out, and the expected value never reaches this process.
"""

# Warm the modules typical test programs use, so forked children do not pay for (or fail at) importing.
import collections  # noqa: E401,F401
import fractions  # noqa: E401,F401
import json
import os
import resource
import secrets
import selectors
import signal
import struct
import sys
import time
import traceback


def _load_sibling(name):
    """A stdlib-only helper module from this file's folder (bound next to us in bwrap), loaded before forking
    by path, so the program cannot import our folder's other files by plain name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                     name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_scratch = _load_sibling("_scratch")  # scratch mounts, privilege drops, clean-up
_wire = _load_sibling("_grading_wire")  # the child's value encoder and the result-line parser

IS_PID1 = os.getpid() == 1
DROP_UID = int(os.environ.get("ALIGN_SBX_DROP_UID", "-1"))
DROP_GID = int(os.environ.get("ALIGN_SBX_DROP_GID", "-1"))
TIER = os.environ.get("ALIGN_SBX_TIER", "rlimits")
# bwrap / unshare: SCRATCH_ROOT is a tmpfs of SCRATCH_MB, RAM taken out of the run's memory_mb (see _set_limits);
# rlimits: a private directory on the host disk that only this zygote uses.
SCRATCH_ROOT = os.environ.get("ALIGN_SBX_SCRATCH", "/tmp")
SCRATCH_MB = int(os.environ.get("ALIGN_SBX_SCRATCH_MB", "0"))
SCRATCH_IN_RAM = TIER in ("bwrap", "unshare")
HOST_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # = align.tools._tiers.HOST_TMP_DIRS
WATCH_SCRATCH = not SCRATCH_IN_RAM and SCRATCH_MB > 0
SCRATCH_KEEP = set()  # what the scratch root held before any program ran (mount points of the Python install)
CHILD_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp", "OPENBLAS_NUM_THREADS": "1",
             "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _read_exact(fd, n):
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _recv(fd):
    head = _read_exact(fd, 4)
    if head is None:
        return None
    (size,) = struct.unpack(">I", head)
    body = _read_exact(fd, size)
    return None if body is None else json.loads(body)


def _send(fd, obj):
    data = json.dumps(obj).encode()
    data = struct.pack(">I", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def _processes_of(uid):
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    n += len(os.listdir(f"/proc/{pid}/task"))
            except OSError:
                pass
    return n


def _set_limits(req):
    cpu = int(req["cpu_s"])
    nproc = int(req["max_processes"])
    if DROP_UID < 0 and not IS_PID1 and os.getuid() != 0:
        # RLIMIT_NPROC counts every process of the real uid on the host: allow max_processes MORE than now
        nproc += _processes_of(os.getuid())
    mem = int(req["memory_mb"]) * 1024 * 1024
    if mem > 0 and SCRATCH_IN_RAM:  # the scratch tmpfs is RAM of this run: it comes out of the same budget
        mem = max(mem - SCRATCH_MB * 1024 * 1024, 1)
    limits = [
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_FSIZE, (int(req["file_mb"]) * 1024 * 1024,) * 2),
        (resource.RLIMIT_NOFILE, (int(req["max_open_files"]),) * 2),
        (resource.RLIMIT_NPROC, (nproc, nproc)),
        (resource.RLIMIT_CORE, (0, 0)),
    ]
    if mem > 0:
        limits.append((resource.RLIMIT_AS, (mem, mem)))
    for which, value in limits:
        try:
            resource.setrlimit(which, value)
        except (ValueError, OSError):
            pass


def _child(req, out_w, err_w, res_w, token, scratch):
    """Runs in the forked child; never returns."""
    try:
        os.setsid()
        os.makedirs(scratch, mode=0o700, exist_ok=True)
        if DROP_UID >= 0:
            os.chown(scratch, DROP_UID, DROP_GID)
        os.chdir(scratch)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.dup2(res_w, 3)
        os.closerange(4, 65536)
        if DROP_UID >= 0:
            os.setgroups([])
            os.setgid(DROP_GID)
            os.setuid(DROP_UID)
        _set_limits(req)
        if DROP_UID < 0 and os.geteuid() == 0:  # uid 0 of a user namespace (unshare without root): no capability
            _scratch.drop_capabilities()
        os.environ.clear()
        os.environ.update(CHILD_ENV, TMPDIR=scratch, HOME=scratch)  # tempfile & co. write inside the scratch
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        sys.stdin = open(0, "r", closefd=False)
        sys.stdout = open(1, "w", closefd=False, errors="backslashreplace")
        sys.stderr = open(2, "w", closefd=False, errors="backslashreplace")
    except BaseException as exc:  # the sandbox itself failed to set up: report and leave
        try:
            os.write(err_w, f"sandbox setup failed: {exc!r}".encode())
        finally:
            os._exit(70)
    _harness(req, token)


def _harness(req, token):
    write, exit_ = os.write, os._exit  # private references taken before untrusted code runs
    encode, eval_, compile_ = _wire.encode, eval, compile
    tests = req.get("tests") or []
    per_test_s = float(req.get("per_test_timeout_s") or 0)

    def report(line):
        write(3, (token + " " + line + "\n").encode())

    def on_alarm(signum, frame):
        raise TimeoutError("timed out")

    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        code = compile(req["code"], "<string>", "exec")
        exec(code, namespace)
        program_error = None
    except SystemExit as exc:
        program_error = None if exc.code in (None, 0) else f"SystemExit({exc.code!r})"
        if not tests:
            _flush()
            exit_(0 if program_error is None else 1)
    except BaseException as exc:  # the program's own error: a failed run, not a sandbox failure
        program_error = _reason(exc)
        traceback.print_exc()
    _flush()
    report("program " + json.dumps(program_error))
    if not tests:
        exit_(0 if program_error is None else 1)
    for i, test in enumerate(tests):
        if program_error is not None:
            report(f"test {i} 0 " + json.dumps(program_error))
            continue
        try:
            if per_test_s > 0:
                signal.signal(signal.SIGALRM, on_alarm)
                signal.setitimer(signal.ITIMER_REAL, per_test_s)
            if isinstance(test, dict):  # "outside" grading: only the expression's value leaves, as plain data
                value = encode(eval_(compile_(test["eval"], "<test>", "eval"), namespace))
                signal.setitimer(signal.ITIMER_REAL, 0)
                _flush()
                report(f"value {i} " + value)
                continue
            exec(compile(test, "<string>", "exec"), namespace)
            signal.setitimer(signal.ITIMER_REAL, 0)
            ok, why = 1, None
        except BaseException as exc:
            signal.setitimer(signal.ITIMER_REAL, 0)
            ok, why = 0, _reason(exc)
        _flush()
        report(f"test {i} {ok} " + json.dumps(why))
    report("done null")
    exit_(0)


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


def _reason(exc):
    if isinstance(exc, SystemExit):
        return f"SystemExit({exc.code!r})"
    if isinstance(exc, RecursionError):
        return "maximum recursion depth exceeded"
    text = str(exc)
    return text if text else ""


def _kill(child_pid):
    """SIGKILL the child's process group and the child (no reaping)."""
    for target in (lambda: os.killpg(child_pid, signal.SIGKILL), lambda: os.kill(child_pid, signal.SIGKILL)):
        try:
            target()
        except OSError:
            pass
    if IS_PID1:
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass


def _kill_leftovers(child_pid):
    """Kill the child's group and, as PID 1 of a namespace, everything else (else re-parented orphans); reap."""
    _kill(child_pid)
    if not IS_PID1:
        _kill_adopted()
    _reap_all()


def _kill_adopted():
    """Without a PID namespace: kill processes re-parented to us (we are a child subreaper)."""
    me = os.getpid()
    for _ in range(3):
        kids = set()
        try:
            for tid in os.listdir(f"/proc/{me}/task"):
                with open(f"/proc/{me}/task/{tid}/children") as fh:
                    kids.update(int(p) for p in fh.read().split())
        except OSError:
            return
        if not kids:
            return
        for pid in kids:
            for fn in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
                try:
                    fn()
                except OSError:
                    pass
        _reap_all()


def _reap_all():
    deadline = time.monotonic() + 2.0
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            if time.monotonic() > deadline:
                return
            time.sleep(0.001)


def run_one(req):
    token = secrets.token_hex(16)
    pipes = [os.pipe() for _ in range(3)]
    scratch = os.path.join(SCRATCH_ROOT, f"align-run-{secrets.token_hex(8)}")  # unique: /tmp may be shared
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        for r, _ in pipes:
            os.close(r)
        _child(req, pipes[0][1], pipes[1][1], pipes[2][1], token, scratch)
    for _, w in pipes:
        os.close(w)
    caps = {0: int(req["max_output_bytes"]), 1: int(req["max_output_bytes"]), 2: 1 << 20}
    bufs = {0: bytearray(), 1: bytearray(), 2: bytearray()}
    truncated = {0: False, 1: False, 2: False}
    sel = selectors.DefaultSelector()
    for i, (r, _) in enumerate(pipes):
        os.set_blocking(r, False)
        sel.register(r, selectors.EVENT_READ, i)
    try:  # readable when the child exits: no polling
        pidfd = os.pidfd_open(pid)
        sel.register(pidfd, selectors.EVENT_READ, "exit")
    except (AttributeError, OSError):
        pidfd = None
    deadline = t0 + float(req["timeout_s"])
    next_watch, scratch_over = t0 + 0.05, False
    timed_out = False
    status = None
    open_fds = 3
    while True:
        now = time.monotonic()
        if status is None:
            try:
                done, st = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, st = pid, 0
            if done:
                status = st
                drain_until = now + 0.05  # output still in flight from the exited child
        if status is not None and (open_fds == 0 or now > drain_until):
            break
        if status is None and WATCH_SCRATCH and now > next_watch and not scratch_over:
            # rlimits: the scratch is host disk with no size of its own; measure it and stop the program at the cap
            next_watch = now + 0.05
            if _scratch.tree_usage(scratch, SCRATCH_MB * 1024 * 1024) is None:
                scratch_over = True
                _kill(pid)
                bufs[1] += f"\nsandbox: scratch space over {SCRATCH_MB} MB (or too many / too deep entries)".encode()
                continue
        if status is None and now > deadline and not timed_out:
            timed_out = True
            _kill(pid)
            continue
        wait = min(0.02 if pidfd is None else (0.05 if WATCH_SCRATCH else 0.5), max(0.0, deadline - now)) if status is None else 0.01
        for key, _ in sel.select(wait):
            i = key.data
            if i == "exit":
                sel.unregister(key.fd)
                continue
            try:
                chunk = os.read(key.fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                sel.unregister(key.fd)
                open_fds -= 1
                continue
            room = caps[i] - len(bufs[i])
            if room > 0:
                bufs[i] += chunk[:room]
            if len(chunk) > room:
                truncated[i] = True
    sel.close()
    if pidfd is not None:
        os.close(pidfd)
    for r, _ in pipes:
        os.close(r)
    if status is None:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            status = 0
    _kill_leftovers(pid)
    elapsed = time.monotonic() - t0
    scratch_left = _clean_scratch()
    program_error, results, values, finished = _wire.parse_results(bytes(bufs[2]).decode("utf-8", "replace"), token)
    return {
        "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "timed_out": timed_out,
        "stdout": bytes(bufs[0]).decode("utf-8", "backslashreplace"),
        "stderr": bytes(bufs[1]).decode("utf-8", "backslashreplace"),
        "stdout_truncated": truncated[0],
        "stderr_truncated": truncated[1],
        "program_error": program_error,
        "tests": [[i, ok, why] for i, (ok, why) in sorted(results.items())],
        "values": [[i, text] for i, text in sorted(values.items())],
        "finished": finished,
        "duration_s": elapsed,
        "scratch_left": scratch_left,
    }


def _clean_scratch():
    """After every run (the program and all its processes are dead): the scratch root is emptied, whatever
    tree the program built there; as root in the rlimits tier, what the dropped uid left in the host's tmp
    directories goes too. Returns the number of entries that could not be removed (the worker is retired)."""
    left = _scratch.clear_dir(SCRATCH_ROOT, keep=SCRATCH_KEEP)
    if TIER == "rlimits" and DROP_UID >= 0:
        left += _scratch.remove_owned(HOST_TMP_DIRS, DROP_UID)
    return left


def main():
    if TIER == "bwrap" and not IS_PID1:
        raise SystemExit("bwrap tier: the zygote is not PID 1 of the sandbox")
    if TIER == "unshare":
        if not (IS_PID1 and os.geteuid() == 0):
            raise SystemExit("unshare tier: the zygote is not PID 1 / root of its namespaces")
        roots = [r for r in os.environ.get("ALIGN_SBX_ROOTS", "").split(":") if r]
        _scratch.private_tmp(roots, SCRATCH_MB, HOST_TMP_DIRS, as_root=DROP_UID >= 0)
        if DROP_UID < 0:  # a user namespace: the program owns what the trainer's user owns, so make it read-only
            _scratch.readonly_host(HOST_TMP_DIRS)
    elif TIER == "rlimits" and (not os.environ.get("ALIGN_SBX_SCRATCH") or SCRATCH_ROOT in HOST_TMP_DIRS):
        raise SystemExit("rlimits tier: ALIGN_SBX_SCRATCH must name a private directory (it is emptied after each run)")
    SCRATCH_KEEP.update(os.listdir(SCRATCH_ROOT))
    if not IS_PID1:
        try:  # adopt orphaned grandchildren so they can be killed after each run
            import ctypes

            ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
        except Exception:
            pass
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    inp, out = 0, os.dup(1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stray prints must not corrupt the protocol
    _send(out, {"ready": True, "pid1": IS_PID1, "uid": os.getuid()})
    while True:
        req = _recv(inp)
        if req is None:
            return
        try:
            resp = run_one(req)
        except Exception as exc:  # report, keep serving
            resp = {"infra_error": repr(exc)}
        _send(out, resp)


if __name__ == "__main__":
    main()
