"""The thread reward calls run in, and the errors a stuck or restarting reward answers with.

A daemon thread of our own, not a ThreadPoolExecutor: a reward call that never returns can only be abandoned
(Python cannot kill a thread), and an executor's worker is joined at interpreter exit, so one hung call would
also hang the shutdown.
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from typing import Any, Callable

from align.errors import AlignError

_NAMES = itertools.count()


class RewardUnavailable(AlignError):
    """The reward is stuck in a call or being replaced: answered 503 with Retry-After at once, not queued."""


def _settle(fut: asyncio.Future, ok: bool, value: Any) -> None:
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


class _Worker:
    """Runs submitted calls one at a time, in order, in one daemon thread named `reward-score-N`."""

    def __init__(self, prefix: str = "reward-score"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name=f"{prefix}-{next(_NAMES)}", daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._jobs.put((loop, fut, fn, args))
        return fut

    def stop(self) -> None:
        """The thread exits after its current call (at once if idle; never, if that call never returns)."""
        self._jobs.put(None)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, fut, fn, args = job
            try:
                value, ok = fn(*args), True
            except BaseException as err:  # noqa: BLE001 - handed to the awaiting coroutine
                value, ok = err, False
            try:
                loop.call_soon_threadsafe(_settle, fut, ok, value)
            except RuntimeError:  # the event loop is closed: nobody is waiting any more
                return
