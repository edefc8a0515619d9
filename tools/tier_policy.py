"""Which sandbox tier a code reward (CodeTests, Themis's code_run) may use: never a weaker one silently.

`require_tier(None)` is the strongest tier this machine starts (at the caller's start-up) and refuses
"rlimits", which has no namespaces; naming a tier ("unshare", "rlimits") is the only way to run weaker.
`required_sandbox(tier)` is one process-wide Sandbox pinned to exactly that tier: if the tier later stops
starting (a fresh worker fails), its `run` raises SandboxUnavailableError and the run fails.
"""
from __future__ import annotations

import atexit
import os
import threading

from align.tools._tiers import TIERS, SandboxUnavailableError
from align.tools.sandbox import Sandbox, SandboxConfig, detect_isolation, isolation_failures

_boxes: dict[str, Sandbox] = {}
_boxes_pid = os.getpid()
_lock = threading.Lock()


def require_tier(isolation: str | None = None, *, who: str = "code rewards") -> str:
    """The tier to pin: `isolation` itself (checked to start here), or the strongest one when None."""
    if isolation is not None:
        if isolation not in TIERS:
            raise SandboxUnavailableError(f"{who}: isolation={isolation!r} is not a sandbox tier; use one of {TIERS}")
        got = detect_isolation(isolation)
        if got != isolation:
            raise SandboxUnavailableError(
                f"{who}: isolation={isolation!r} does not start on this machine "
                f"({isolation_failures().get(isolation, 'probe failed')}); fix it or name a weaker tier")
        return isolation
    got = detect_isolation("bwrap")
    failed = "; ".join(f"{t}: {w}" for t, w in isolation_failures().items())
    if got == "none":
        raise SandboxUnavailableError(f"{who}: no sandbox tier starts on this machine ({failed}); install bubblewrap")
    if got == "rlimits":
        raise SandboxUnavailableError(
            f"{who}: only the 'rlimits' tier (no namespaces: /proc, host files and loopback stay reachable) starts "
            f"here ({failed}); install bubblewrap, or accept it by name with isolation='rlimits'")
    return got


def required_sandbox(tier: str) -> Sandbox:
    """The process-wide Sandbox pinned to exactly `tier` (prefer == min_isolation == tier)."""
    global _boxes_pid
    with _lock:
        if _boxes_pid != os.getpid():  # forked: the parent's workers (pipes) are not ours to use
            _boxes.clear()
            _boxes_pid = os.getpid()
        box = _boxes.get(tier)
        if box is None or box._closed:
            box = _boxes[tier] = Sandbox(SandboxConfig(prefer=tier, min_isolation=tier))
        return box


@atexit.register
def _close_all() -> None:
    if _boxes_pid == os.getpid():
        for box in list(_boxes.values()):
            box.close()


__all__ = ["require_tier", "required_sandbox"]
