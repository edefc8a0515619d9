"""Run untrusted Python with per-test grading: `run_code(code, tests) -> ExecResult`.

Tiers, strongest first (the reached tier is reported on every result as `isolation`):
  "bwrap"   : bubblewrap with new PID / network / IPC / UTS namespaces, read-only binds of /usr, /lib and the
              Python install only (host files such as /etc/passwd or the repo are absent), a tmpfs /tmp,
              cleared environment, all capabilities dropped for the program.
  "unshare" : util-linux `unshare` with new PID / network / IPC / mount namespaces (host files stay visible).
  "rlimits" : a plain child process with rlimits, a new session, process-group kill and a subreaper sweep
              (no network isolation: loopback services are reachable).
In every tier, when we run as root the program runs as an unprivileged uid of its own per worker (61000+k),
so RLIMIT_NPROC is enforced and root-owned files and processes are out of its reach. In the PID-namespace
tiers the zygote is PID 1 and kills everything else in the namespace after each run.
A warm interpreter (`tools/_zygote.py`) lives inside ONE long-lived sandbox per worker and forks a fresh
child per run, which is what makes >= 60 runs/s possible on 2 cores (a bwrap + python spawn per run does ~22/s).
"""
from __future__ import annotations

import atexit
import json
import math
import os
import queue
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from align.errors import UserError
from align.tools.grading import IN_SANDBOX, OUTSIDE, TestPlan, grade, plan

TIERS = ("rlimits", "unshare", "bwrap")  # weakest -> strongest
_ZYGOTE = Path(__file__).with_name("_zygote.py")
_WIRE = Path(__file__).with_name("_grading_wire.py")  # loaded by the zygote from its own folder


class SandboxUnavailableError(UserError, RuntimeError):
    """The machine cannot provide the configured minimum isolation tier."""


@dataclass(frozen=True)
class SandboxConfig:
    """Limits for one sandboxed run and for the worker pool.

    min_isolation: refuse to run below this tier ("rlimits" < "unshare" < "bwrap").
    prefer: the strongest tier to try ("bwrap" tries all three).
    """

    timeout_s: float = 5.0
    memory_mb: int = 1024
    file_mb: int = 16
    max_open_files: int = 64
    max_processes: int = 32
    max_output_bytes: int = 64 * 1024
    per_test_timeout_s: float = 0.0  # 0: only the whole-run timeout applies
    workers: int = field(default_factory=lambda: max(1, min(8, os.cpu_count() or 2)))
    min_isolation: str = "rlimits"
    prefer: str = "bwrap"

    def __post_init__(self):
        for key in ("min_isolation", "prefer"):
            if getattr(self, key) not in TIERS:
                raise ValueError(f"SandboxConfig.{key}={getattr(self, key)!r} is not a tier; use one of {TIERS}")
        if TIERS.index(self.prefer) < TIERS.index(self.min_isolation):
            raise ValueError(f"SandboxConfig.prefer={self.prefer!r} is weaker than min_isolation={self.min_isolation!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"SandboxConfig.timeout_s must be > 0, got {self.timeout_s}")
        if self.memory_mb < 0 or self.file_mb < 0:
            raise ValueError("SandboxConfig.memory_mb and file_mb must be >= 0 (0 disables the memory cap)")
        if self.workers < 1:
            raise ValueError(f"SandboxConfig.workers must be >= 1, got {self.workers}")


@dataclass
class TestOutcome:
    """grading: "outside" (the value came back as plain data and was compared here) or "in_sandbox" (the test
    statement ran in the program's interpreter: fakeable by a hostile program); see `align.tools.grading`.
    value: the plain-data text of the tested expression's value (outside grading; first 200 characters)."""

    ok: bool
    error: str | None = None
    grading: str = IN_SANDBOX
    value: str | None = None


@dataclass
class ExecResult:
    """status: "ok" (ran; every test passed, or no tests and exit 0), "failed" (some test failed),
    "error" (the program raised / exited non-zero), "timeout", "crashed" (killed by a signal: segfault,
    CPU limit, memory kill), "sandbox_error" (infrastructure: never a verdict on the program)."""

    status: str
    stdout: str = ""
    stderr: str = ""
    passed: int = 0
    failed: int = 0
    isolation: str = "none"
    tests: list[TestOutcome] = field(default_factory=list)
    program_error: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    duration_s: float = 0.0
    stdout_truncated: bool = False
    error: str | None = None  # infrastructure error text when status == "sandbox_error"

    @property
    def grading(self) -> str:
        """"outside" when every test was graded outside the sandbox, "in_sandbox" when every one ran inside it,
        "mixed" for both, "none" without tests."""
        modes = {t.grading for t in self.tests}
        return "none" if not modes else modes.pop() if len(modes) == 1 else "mixed"

    @property
    def in_sandbox_tests(self) -> int:
        """How many tests ran in the weaker in_sandbox mode."""
        return sum(t.grading != OUTSIDE for t in self.tests)

    @property
    def pass_rate(self) -> float:
        total = self.passed + self.failed
        return self.passed / total if total else 0.0

    @property
    def failure_reasons(self) -> list[str]:
        """Distinct non-empty failure messages in test order (assertion failures have none)."""
        seen: list[str] = []
        for t in self.tests:
            if not t.ok and t.error and t.error not in seen:
                seen.append(t.error)
        return seen


# --------------------------------------------------------------------------------------------------- tiers
def _python_roots() -> list[str]:
    roots = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}
    exe_dir = os.path.dirname(os.path.realpath(sys.executable))
    if not any(exe_dir.startswith(r + os.sep) for r in roots):
        roots.add(exe_dir)
    return sorted(roots)


def _is_root() -> bool:
    return os.geteuid() == 0


def _world_traversable(path: str) -> bool:
    p = Path(path)
    for part in [p, *p.parents]:
        try:
            if not part.stat().st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


_uid_counter = iter(range(10**9))
_UID_BASE, _UID_SPAN = 61000, 2000


def _command(tier: str) -> tuple[list[str], dict[str, str]]:
    """argv and environment that start a zygote at `tier`."""
    python = sys.executable
    # As root, the program runs as an unprivileged uid of its own per worker (61000 + k): RLIMIT_NPROC then
    # applies and counts only that worker's processes, and host files and processes are out of reach. In the
    # unshare tier the zygote first re-mounts a closed python install (e.g. under /root 0700) open.
    uid = _UID_BASE + next(_uid_counter) % _UID_SPAN if _is_root() else -1
    env = {"ALIGN_SBX_DROP_UID": str(uid), "ALIGN_SBX_DROP_GID": str(uid)}
    if _is_root() and tier == "unshare":
        closed = [r for r in _python_roots() if not _world_traversable(r)]
        if closed:
            env["ALIGN_SBX_REOPEN"] = ":".join(closed)
    if tier == "bwrap":
        argv = ["bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        if not _is_root():
            argv += ["--unshare-user"]
        argv += ["--as-pid-1", "--die-with-parent", "--new-session", "--clearenv"]
        for k, v in env.items():
            argv += ["--setenv", k, v]
        for d in ("/usr", "/bin", "/lib", "/lib64", "/lib32", "/etc/alternatives", "/etc/ld.so.cache"):
            argv += ["--ro-bind-try", d, d]
        # /tmp first: a Python install (a venv) that lives under /tmp must be bound on top of the tmpfs
        argv += ["--tmpfs", "/tmp"]
        made: set[str] = set()
        for root in _python_roots():
            for parent in reversed(Path(root).parents):  # bwrap makes missing parents 0700: open them up
                if str(parent) != "/" and str(parent) not in made:
                    made.add(str(parent))
                    argv += ["--perms", "0755", "--dir", str(parent)]
            argv += ["--ro-bind", root, root]
        argv += ["--ro-bind", str(_ZYGOTE), "/sandbox/zygote.py", "--ro-bind", str(_WIRE), "/sandbox/_grading_wire.py",
                 "--proc", "/proc", "--dev", "/dev",
                 "--chdir", "/tmp", "--cap-drop", "ALL"]
        if _is_root():  # the zygote keeps what it needs to drop the program to its own uid and clean up after it
            for cap in ("CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER"):
                argv += ["--cap-add", cap]
        return argv + [python, "-I", "/sandbox/zygote.py"], {}
    base = [python, "-I", str(_ZYGOTE)]
    full_env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **env}
    if tier == "unshare":
        flags = ["--pid", "--net", "--ipc", "--uts", "--mount", "--fork", "--kill-child", "--mount-proc"]
        if not _is_root():
            flags.insert(0, "--map-root-user")
        return ["unshare", *flags, *base], full_env
    return base, full_env


_tier_cache: dict[str, str] = {}
_tier_lock = threading.Lock()


def detect_isolation(prefer: str = "bwrap") -> str:
    """The strongest tier (up to `prefer`) whose zygote starts and answers a probe on this machine."""
    with _tier_lock:
        if prefer in _tier_cache:
            return _tier_cache[prefer]
        for tier in reversed(TIERS[: TIERS.index(prefer) + 1]):
            if tier != "rlimits" and shutil.which(tier if tier == "bwrap" else "unshare") is None:
                continue
            try:
                worker = _spawn(tier)
                probe = worker.request(_request("print(1)", ["assert True"], SandboxConfig(timeout_s=5)), 15)
                worker.close()
                if probe.get("tests") == [[0, True, None]] and probe.get("stdout") == "1\n":
                    _tier_cache[prefer] = tier
                    return tier
            except Exception:
                continue
        _tier_cache[prefer] = "none"
        return "none"


# --------------------------------------------------------------------------------------------------- workers
def _request(code: str, tests: list[str] | None, cfg: SandboxConfig, **over) -> dict:
    timeout_s = float(over.get("timeout_s") or cfg.timeout_s)
    return {
        "code": code,
        "tests": list(tests or []),
        "timeout_s": timeout_s,
        "cpu_s": max(1, math.ceil(timeout_s)),
        "memory_mb": int(over.get("memory_mb") if over.get("memory_mb") is not None else cfg.memory_mb),
        "file_mb": cfg.file_mb,
        "max_open_files": cfg.max_open_files,
        "max_processes": cfg.max_processes,
        "max_output_bytes": cfg.max_output_bytes,
        "per_test_timeout_s": float(over.get("per_test_timeout_s") or cfg.per_test_timeout_s),
    }


class _Worker:
    """One zygote process (inside its own sandbox) speaking the length-prefixed JSON protocol."""

    def __init__(self, tier: str):
        self.tier = tier
        argv, env = _command(tier)
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=env, start_new_session=True, cwd="/", close_fds=True)
        hello = self._recv(20.0)
        if not hello.get("ready"):
            raise RuntimeError(f"{tier} zygote did not start: {hello}")

    def _recv(self, timeout: float) -> dict:
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout

        def read(n: int) -> bytes:
            buf = b""
            while len(buf) < n:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    raise TimeoutError("sandbox worker did not answer in time")
                chunk = os.read(fd, n - len(buf))
                if not chunk:
                    raise EOFError("sandbox worker exited")
                buf += chunk
            return buf

        (size,) = struct.unpack(">I", read(4))
        return json.loads(read(size))

    def request(self, req: dict, timeout: float) -> dict:
        data = json.dumps(req).encode()
        self.proc.stdin.write(struct.pack(">I", len(data)) + data)
        self.proc.stdin.flush()
        return self._recv(timeout)

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except Exception:
                pass


# bwrap --die-with-parent is a parent-death signal, which fires when the *thread* that started the worker
# exits: start every worker from this one long-lived thread so workers outlive short-lived caller threads.
_spawner = None
_spawner_lock = threading.Lock()


def _spawn(tier: str) -> "_Worker":
    global _spawner
    from concurrent.futures import ThreadPoolExecutor

    with _spawner_lock:
        if _spawner is None or getattr(_spawner, "_align_pid", None) != os.getpid():
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-spawner")
            _spawner._align_pid = os.getpid()
        spawner = _spawner
    return spawner.submit(_Worker, tier).result()


class Sandbox:
    """A pool of warm zygote workers at the strongest available tier; thread-safe."""

    def __init__(self, config: SandboxConfig | None = None):
        self.config = config or SandboxConfig()
        self.isolation = detect_isolation(self.config.prefer)
        if self.isolation == "none" or TIERS.index(self.isolation) < TIERS.index(self.config.min_isolation):
            raise SandboxUnavailableError(
                f"sandbox tier {self.isolation!r} is below min_isolation={self.config.min_isolation!r}; install "
                "bubblewrap (apt-get install bubblewrap) or allow user namespaces, or lower min_isolation")
        self._idle: queue.Queue[_Worker | None] = queue.Queue()
        for _ in range(self.config.workers):
            self._idle.put(None)  # started lazily
        self._closed = False

    def run(self, code: str, tests: list[str] | None = None, *, timeout_s: float | None = None,
            memory_mb: int | None = None, per_test_timeout_s: float | None = None) -> ExecResult:
        if not isinstance(code, str):
            return ExecResult("sandbox_error", isolation=self.isolation, error="code must be a str")
        tests = [str(t) for t in (tests or [])]
        plans = [plan(t) for t in tests]  # parsed here: expected values stay in this process
        req = _request(code, [p.wire() for p in plans], self.config, timeout_s=timeout_s, memory_mb=memory_mb,
                       per_test_timeout_s=per_test_timeout_s)
        worker = self._idle.get()
        try:
            for attempt in (0, 1):
                if worker is not None and worker.proc.poll() is not None:
                    worker.close()  # died while idle: replace it silently
                    worker = None
                if worker is None:
                    worker = _spawn(self.isolation)
                try:
                    resp = worker.request(req, req["timeout_s"] + 10.0)
                    break
                except (EOFError, BrokenPipeError):
                    if attempt:  # a fresh worker died on this request: report it
                        raise
                    worker.close()
                    worker = None
        except Exception as exc:
            if worker is not None:
                worker.close()
            worker = None
            return ExecResult("sandbox_error", isolation=self.isolation, failed=len(tests),
                              tests=[TestOutcome(False, "sandbox error", p.mode) for p in plans],
                              error=f"sandbox worker failed: {exc!r}")
        finally:
            self._idle.put(worker)
        return _to_result(resp, plans, self.isolation)

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                w = self._idle.get_nowait()
            except queue.Empty:
                return
            if w is not None:
                w.close()


def _outcome(p: TestPlan, got: TestOutcome | None, value: str | None) -> TestOutcome | None:
    """An outside-graded test passes only through `grade` on a value: a "passed" line cannot pass it."""
    if p.mode != OUTSIDE:
        return got
    if value is not None:
        ok, why = grade(p, value)
        return TestOutcome(ok, why, OUTSIDE, value[:200])
    if got is not None and not got.ok:
        return TestOutcome(False, got.error, OUTSIDE)
    return None


def _to_result(resp: dict, plans: list[TestPlan], isolation: str) -> ExecResult:
    tests = [p.source for p in plans]
    if "infra_error" in resp:
        return ExecResult("sandbox_error", isolation=isolation, failed=len(tests), error=resp["infra_error"])
    got = {int(i): TestOutcome(bool(ok), why) for i, ok, why in resp.get("tests", [])}
    values = {int(i): text for i, text in resp.get("values", [])}
    sig, code = resp.get("signal"), resp.get("exit_code")
    # RLIMIT_CPU (set to the run's timeout) is a time limit too: a busy program can reach it a moment before the
    # wall-clock deadline, and which of the two fires first must not change the verdict.
    timed_out = bool(resp["timed_out"]) or sig == signal.SIGXCPU
    outcomes = []
    for i, p in enumerate(plans):
        outcome = _outcome(p, got.get(i), values.get(i))
        if outcome is not None:
            outcomes.append(outcome)
        elif timed_out:
            outcomes.append(TestOutcome(False, "timed out", p.mode))
        else:
            outcomes.append(TestOutcome(False, resp.get("program_error") or "test did not run (the program exited)",
                                        p.mode))
    passed = sum(t.ok for t in outcomes)
    if timed_out:
        status = "timeout"
    elif sig is not None:
        status = "crashed"
    elif code == 70 and "sandbox setup failed" in resp.get("stderr", ""):
        status = "sandbox_error"
    elif tests:
        status = "ok" if passed == len(tests) and resp.get("finished") else "failed"
    else:
        status = "ok" if code == 0 else "error"
    return ExecResult(status=status, stdout=resp.get("stdout", ""), stderr=resp.get("stderr", ""), passed=passed,
                      failed=len(tests) - passed, isolation=isolation, tests=outcomes,
                      program_error=resp.get("program_error"), exit_code=code, signal=sig,
                      duration_s=float(resp.get("duration_s", 0.0)),
                      stdout_truncated=bool(resp.get("stdout_truncated")),
                      error=resp.get("stderr") if status == "sandbox_error" else None)


_default: Sandbox | None = None
_default_pid = 0
_default_lock = threading.Lock()


def get_sandbox(config: SandboxConfig | None = None) -> Sandbox:
    """The process-wide sandbox (created on first use); pass `config` to replace it."""
    global _default, _default_pid
    with _default_lock:
        if _default is not None and _default_pid != os.getpid():
            _default = None  # forked: the parent's workers (pipes) are not ours to use
        _default_pid = os.getpid()
        if config is not None and (_default is None or _default.config != config):
            if _default is not None:
                _default.close()
            _default = Sandbox(config)
        elif _default is None:
            _default = Sandbox()
        return _default


@atexit.register
def _close_default() -> None:
    if _default is not None and _default_pid == os.getpid():
        _default.close()


def run_code(code: str, tests: list[str] | None = None, timeout_s: float | None = None,
             memory_mb: int | None = None, per_test_timeout_s: float | None = None,
             sandbox: Sandbox | None = None) -> ExecResult:
    """Run `code`, then each of `tests` (Python statements, e.g. asserts) in its namespace, in the sandbox.

    A test of an honest form (`assert f(1, 2) == 3`, ...; see `align.tools.grading`) is graded "outside":
    only `f(1, 2)` enters the sandbox, its value comes back as plain data and is compared here, so nothing the
    program does inside can pass it without producing the right value. Other tests run "in_sandbox" (weaker,
    reported per test as `TestOutcome.grading` and as `ExecResult.grading`). A test counts only when its
    result came back, so `sys.exit(0)` before the tests or printed "passed" text does not pass. Never raises
    for bad code; infrastructure failure is status "sandbox_error".
    """
    box = sandbox or get_sandbox()
    return box.run(code, tests, timeout_s=timeout_s, memory_mb=memory_mb, per_test_timeout_s=per_test_timeout_s)


__all__ = ["ExecResult", "TestOutcome", "Sandbox", "SandboxConfig", "SandboxUnavailableError", "TIERS",
           "detect_isolation", "get_sandbox", "run_code"]
