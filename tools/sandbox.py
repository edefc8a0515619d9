"""Run untrusted Python with per-test grading: `run_code(code, tests) -> ExecResult`.

Tiers, strongest first (docs/security.md#sandbox-tiers says what each isolates and does not):
  "bwrap"   : bubblewrap: new PID / network / IPC / UTS / mount namespaces, only /usr, /lib and the Python install
              bound read-only, a size-limited tmpfs /tmp as the only writable place, all capabilities dropped.
  "unshare" : util-linux `unshare`: new PID / network / IPC / mount namespaces; host files stay visible, but one
              private size-limited tmpfs covers /tmp, /var/tmp, /dev/shm and /run/lock.
  "rlimits" : a plain child with rlimits, a new session and a subreaper sweep; a private host scratch directory
              measured while the program runs; no namespaces (/proc, host files and loopback stay reachable).
As root the program runs as an unprivileged uid of its own per worker (61000+k). A Sandbox's tier is chosen once
(`detect_isolation`, which logs and records why any stronger tier failed) and never changes: a worker that can
no longer start at it raises SandboxUnavailableError. The reached tier is on every result as `isolation`.
A warm interpreter (`tools/_zygote.py`) lives inside ONE long-lived sandbox per worker and forks a fresh
child per run, which is what makes >= 60 runs/s possible on 2 cores (a bwrap + python spawn per run does ~22/s).
"""
from __future__ import annotations

import atexit
import json
import logging
import math
import os
import queue
import select
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field

from align.tools._tiers import TIERS, SandboxUnavailableError, command
from align.tools.exec_result import ExecResult, TestOutcome, to_result
from align.tools.grading import plan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SandboxConfig:
    """Limits for one sandboxed run and for the worker pool.

    min_isolation: refuse to run below this tier ("rlimits" < "unshare" < "bwrap").
    prefer: the strongest tier to try ("bwrap" tries all three). prefer == min_isolation requires that tier.
    scratch_mb: the program's writable scratch space. bwrap / unshare: a tmpfs of exactly this size whose RAM
    is taken out of memory_mb (the address-space limit is memory_mb - scratch_mb); rlimits: a private host
    directory, per file capped by file_mb only.
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
    scratch_mb: int = 64

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
        if self.scratch_mb < 1:
            raise ValueError(f"SandboxConfig.scratch_mb must be >= 1, got {self.scratch_mb}")
        _check_memory(self.memory_mb, self.scratch_mb)


def _check_memory(memory_mb: int, scratch_mb: int) -> None:
    if memory_mb and memory_mb < scratch_mb + 64:
        raise ValueError(f"memory_mb={memory_mb} leaves the program under 64 MB once the scratch_mb={scratch_mb} "
                         "tmpfs is taken out of it; raise memory_mb or lower SandboxConfig.scratch_mb")


_tier_cache: dict[str, str] = {}
_tier_failures: dict[str, str] = {}  # tier -> why its probe failed (first failure on this machine)
_tier_lock = threading.Lock()


def detect_isolation(prefer: str = "bwrap") -> str:
    """The strongest tier (up to `prefer`) whose zygote starts and answers a probe on this machine.

    A stronger tier that fails is never skipped silently: why it failed is logged as a warning and kept in
    `isolation_failures()` (and in `Sandbox.isolation_failures`)."""
    with _tier_lock:
        if prefer in _tier_cache:
            return _tier_cache[prefer]
        chosen = "none"
        for tier in reversed(TIERS[: TIERS.index(prefer) + 1]):
            why = _probe(tier)
            if why is None:
                chosen = tier
                break
            _tier_failures.setdefault(tier, why)
            log.warning("sandbox: the %s tier is unavailable (%s); trying a weaker one", tier, why)
        _tier_cache[prefer] = chosen
        return chosen


def isolation_failures() -> dict[str, str]:
    """Tier -> why it failed its probe in this process (empty when every tried tier worked)."""
    with _tier_lock:
        return dict(_tier_failures)


def _probe(tier: str) -> str | None:
    """None when a zygote starts at `tier` and grades a trivial program; else the reason, in one line."""
    if tier != "rlimits" and shutil.which(tier if tier == "bwrap" else "unshare") is None:
        return f"{'bwrap' if tier == 'bwrap' else 'unshare'} is not installed"
    try:
        worker = _spawn(tier, SandboxConfig().scratch_mb)
    except Exception as exc:
        return f"the zygote did not start: {exc}"
    try:
        probe = worker.request(_request("print(1)", ["assert True"], SandboxConfig(timeout_s=5)), 15)
    except Exception as exc:
        return f"the probe got no answer: {exc!r}; {worker.stderr_tail()}"
    finally:
        worker.close()
    if probe.get("tests") == [[0, True, None]] and probe.get("stdout") == "1\n":
        return None
    return f"the probe answered {str(probe)[:300]}"


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

    def __init__(self, tier: str, scratch_mb: int):
        self.tier = tier
        # rlimits: no mount namespace, so the scratch root is a private host directory (0711: the dropped uid
        # may enter only its own per-run directory inside); we remove it when the worker goes.
        self.scratch_root = None
        if tier == "rlimits":
            self.scratch_root = tempfile.mkdtemp(prefix="align-sbx-")
            os.chmod(self.scratch_root, 0o711)
        argv, env = command(tier, scratch_mb, self.scratch_root)
        self._err = tempfile.TemporaryFile()  # the zygote's own stderr: why it failed to start, if it did
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                                         env=env, start_new_session=True, cwd="/", close_fds=True)
            hello = self._recv(20.0)
        except Exception as exc:
            tail = self.stderr_tail() if hasattr(self, "proc") else ""
            self.close()
            raise RuntimeError(f"{tier} zygote did not start: {exc!r} {tail}".strip()) from None
        if not hello.get("ready"):
            self.close()
            raise RuntimeError(f"{tier} zygote did not start: {hello}")

    def stderr_tail(self) -> str:
        """The last line the zygote (not a program: theirs goes to per-run pipes) wrote to stderr."""
        try:
            self._err.seek(0)
            lines = self._err.read()[-2000:].decode("utf-8", "replace").strip().splitlines()
            return lines[-1][:300] if lines else ""
        except (OSError, ValueError):
            return ""

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
        if not hasattr(self, "proc"):  # Popen itself failed
            self._err.close()
            if self.scratch_root is not None:
                os.rmdir(self.scratch_root)
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:
            pass
        for stream in (self.proc.stdin, self.proc.stdout, self._err):
            try:
                stream.close()
            except Exception:
                pass
        if self.scratch_root is not None:
            from align.tools._scratch import remove_tree

            remove_tree(self.scratch_root)


# bwrap --die-with-parent is a parent-death signal, which fires when the *thread* that started the worker
# exits: start every worker from this one long-lived thread so workers outlive short-lived caller threads.
_spawner = None
_spawner_lock = threading.Lock()


def _spawn(tier: str, scratch_mb: int) -> "_Worker":
    global _spawner
    from concurrent.futures import ThreadPoolExecutor

    with _spawner_lock:
        if _spawner is None or getattr(_spawner, "_align_pid", None) != os.getpid():
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-spawner")
            _spawner._align_pid = os.getpid()
        spawner = _spawner
    return spawner.submit(_Worker, tier, scratch_mb).result()


class Sandbox:
    """A pool of warm zygote workers, all at ONE tier chosen at start-up; thread-safe.

    The tier never changes afterwards: when a fresh worker cannot be started at it, `run` raises
    SandboxUnavailableError (the caller's run fails) instead of grading at a weaker tier."""

    def __init__(self, config: SandboxConfig | None = None):
        self.config = config or SandboxConfig()
        self.isolation = detect_isolation(self.config.prefer)
        # why each tier stronger than the chosen one failed (empty when the strongest wanted tier works)
        failures = isolation_failures()
        self.isolation_failures = {t: failures[t] for t in TIERS[: TIERS.index(self.config.prefer) + 1]
                                   if t in failures and (self.isolation == "none" or TIERS.index(t) > TIERS.index(self.isolation))}
        if self.isolation == "none" or TIERS.index(self.isolation) < TIERS.index(self.config.min_isolation):
            why = "; ".join(f"{t}: {w}" for t, w in self.isolation_failures.items())
            raise SandboxUnavailableError(
                f"sandbox tier {self.isolation!r} is below min_isolation={self.config.min_isolation!r} ({why}); install "
                "bubblewrap (apt-get install bubblewrap) or allow user namespaces, or lower min_isolation")
        self._idle: queue.Queue[_Worker | None] = queue.Queue()
        for _ in range(self.config.workers):
            self._idle.put(None)  # started lazily
        self._closed = False

    def _fresh_worker(self) -> _Worker:
        last: Exception | None = None
        for _ in range(2):  # one retry: a transient fork / pipe failure is not a lost tier
            try:
                return _spawn(self.isolation, self.config.scratch_mb)
            except Exception as exc:  # noqa: BLE001 - reported below as the tier being gone
                last = exc
        raise SandboxUnavailableError(
            f"the sandbox's {self.isolation!r} tier no longer starts ({last}); refusing to run weaker: fix the "
            f"machine or configure a weaker tier by name") from None

    def run(self, code: str, tests: list[str] | None = None, *, timeout_s: float | None = None,
            memory_mb: int | None = None, per_test_timeout_s: float | None = None) -> ExecResult:
        if not isinstance(code, str):
            return ExecResult("sandbox_error", isolation=self.isolation, error="code must be a str")
        if memory_mb is not None and self.isolation != "rlimits":
            _check_memory(memory_mb, self.config.scratch_mb)
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
                    worker = self._fresh_worker()
                try:
                    resp = worker.request(req, req["timeout_s"] + 10.0)
                    break
                except (EOFError, BrokenPipeError):
                    if attempt:  # a fresh worker died on this request: report it
                        raise
                    worker.close()
                    worker = None
            if resp.get("scratch_left"):  # something in its scratch resisted removal: a new worker, new tmpfs
                worker.close()
                worker = None
        except SandboxUnavailableError:
            raise
        except Exception as exc:
            if worker is not None:
                worker.close()
            worker = None
            return ExecResult("sandbox_error", isolation=self.isolation, failed=len(tests),
                              tests=[TestOutcome(False, "sandbox error", p.mode) for p in plans],
                              error=f"sandbox worker failed: {exc!r}")
        finally:
            self._idle.put(worker)
        return to_result(resp, plans, self.isolation)

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                w = self._idle.get_nowait()
            except queue.Empty:
                return
            if w is not None:
                w.close()


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
           "detect_isolation", "get_sandbox", "isolation_failures", "run_code"]
