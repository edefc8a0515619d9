"""How a sandbox zygote is started at each isolation tier: the command line, its binds and its environment.

Re-exported by `align.tools.sandbox` (which picks the tier); this module only builds argv / env and knows
which paths the Python install needs. What each tier isolates is written out in docs/security.md.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from align.errors import UserError

TIERS = ("rlimits", "unshare", "bwrap")  # weakest -> strongest
_HERE = Path(__file__).resolve().parent
_ZYGOTE = _HERE / "_zygote.py"
_WIRE = _HERE / "_grading_wire.py"  # the child-side value encoder / result-line parser (stdlib only)
_SCRATCH = _HERE / "_scratch.py"  # the zygote's scratch set-up / clean-up helpers (stdlib only)
# The dropped uid's world-writable places on a host: the unshare tier covers each with its private tmpfs.
HOST_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


class SandboxUnavailableError(UserError, RuntimeError):
    """The machine cannot provide (or no longer provides) the isolation tier the sandbox requires."""


def python_binds() -> list[tuple[str, str]]:
    """(source, destination) pairs that make this interpreter runnable inside a fresh mount tree.

    A venv reached through a symlink (`/tmp/link -> /work/.venv`, run as `/tmp/link/bin/python`) has
    sys.prefix / sys.executable under the symlink's path but its files under the real path: bind the real
    path at both, or `python` is missing in the sandbox (the probe then fails and a weaker tier won)."""
    pairs: dict[str, str] = {}
    paths = [sys.base_prefix, sys.prefix, os.path.dirname(sys.executable),
             os.path.dirname(os.path.realpath(sys.executable))]
    for path in paths:
        real = os.path.realpath(path)
        for dest in (real, os.path.abspath(path)):
            pairs.setdefault(dest, real)
    # a destination inside another bound one is already there (binding it again would hide nothing, but the
    # nested --dir / --ro-bind would fail on a read-only parent)
    dests = sorted(pairs)
    kept = [d for d in dests if not any(d != o and d.startswith(o.rstrip("/") + "/") for o in dests)]
    return [(pairs[d], d) for d in kept]


def python_roots() -> list[str]:
    """Every destination path of `python_binds` (what the unshare tier must keep reachable)."""
    return [dest for _, dest in python_binds()]


def is_root() -> bool:
    return os.geteuid() == 0


def world_traversable(path: str) -> bool:
    p = Path(path)
    for part in [p, *p.parents]:
        try:
            if not part.stat().st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


_uid_counter = iter(range(10**9))
UID_BASE, UID_SPAN = 61000, 2000


def command(tier: str, scratch_mb: int, scratch_root: str | None = None) -> tuple[list[str], dict[str, str]]:
    """argv and environment that start a zygote at `tier` with `scratch_mb` of scratch space.

    bwrap / unshare: the scratch is a tmpfs of exactly scratch_mb (RAM the run's address-space limit is
    reduced by, see _zygote._set_limits); rlimits: `scratch_root`, a private directory on the host disk."""
    python = sys.executable
    # As root, the program runs as an unprivileged uid of its own per worker (61000 + k): RLIMIT_NPROC then
    # applies and counts only that worker's processes, and host files and processes are out of reach.
    uid = UID_BASE + next(_uid_counter) % UID_SPAN if is_root() else -1
    env = {"ALIGN_SBX_DROP_UID": str(uid), "ALIGN_SBX_DROP_GID": str(uid), "ALIGN_SBX_TIER": tier,
           "ALIGN_SBX_SCRATCH_MB": str(int(scratch_mb))}
    if tier == "bwrap":
        argv = ["bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        if not is_root():
            argv += ["--unshare-user"]
        argv += ["--as-pid-1", "--die-with-parent", "--new-session", "--clearenv"]
        for k, v in {**env, "ALIGN_SBX_SCRATCH": "/tmp"}.items():
            argv += ["--setenv", k, v]
        for d in ("/usr", "/bin", "/lib", "/lib64", "/lib32", "/etc/alternatives", "/etc/ld.so.cache"):
            argv += ["--ro-bind-try", d, d]
        # /tmp first: a Python install (a venv) that lives under /tmp must be bound on top of the tmpfs. The
        # tmpfs is the run's scratch, sized so that its RAM is bounded and counted (bwrap >= 0.5: --size).
        argv += ["--size", str(int(scratch_mb) * 1024 * 1024), "--tmpfs", "/tmp"]
        made: set[str] = set()
        for src, dest in python_binds():
            for parent in reversed(Path(dest).parents):  # bwrap makes missing parents 0700: open them up
                if str(parent) != "/" and str(parent) not in made:
                    made.add(str(parent))
                    argv += ["--perms", "0755", "--dir", str(parent)]
            argv += ["--ro-bind", src, dest]
        argv += ["--ro-bind", str(_ZYGOTE), "/sandbox/zygote.py", "--ro-bind", str(_SCRATCH), "/sandbox/_scratch.py",
                 "--ro-bind", str(_WIRE), "/sandbox/_grading_wire.py",
                 "--proc", "/proc", "--dev", "/dev", "--chdir", "/tmp", "--cap-drop", "ALL"]
        # bwrap's own root and /dev are tmpfs too, with no size; without root the program owns them. Read-only,
        # they leave the sized /tmp the only writable place (device nodes stay writable on a read-only mount).
        argv += ["--remount-ro", "/dev", "--remount-ro", "/"]
        if is_root():  # the zygote keeps what it needs to drop the program to its own uid and clean up after it
            for cap in ("CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER"):
                argv += ["--cap-add", cap]
        return argv + [python, "-I", "/sandbox/zygote.py"], {}
    base = [python, "-I", str(_ZYGOTE)]
    full_env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **env}
    if tier == "unshare":
        # The zygote (PID 1, root of its mount namespace) mounts one private tmpfs of scratch_mb over every
        # host tmp directory and re-binds the Python install on top (see _scratch.private_tmp).
        full_env["ALIGN_SBX_ROOTS"] = ":".join(python_roots())
        full_env["ALIGN_SBX_SCRATCH"] = "/tmp"
        flags = ["--pid", "--net", "--ipc", "--uts", "--mount", "--fork", "--kill-child", "--mount-proc"]
        if not is_root():
            flags.insert(0, "--map-root-user")
        return ["unshare", *flags, *base], full_env
    if scratch_root is None:
        raise ValueError("the rlimits tier needs a scratch_root directory")
    full_env["ALIGN_SBX_SCRATCH"] = scratch_root
    return base, full_env


__all__ = ["HOST_TMP_DIRS", "TIERS", "SandboxUnavailableError", "command", "python_binds", "python_roots"]
