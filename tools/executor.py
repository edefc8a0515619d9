"""Concurrent tool calls for a reward worker: a bounded thread pool, per-call timeouts, an optional LRU cache.

Tools that run code or arithmetic already do their work in killable child processes with their own
deadlines; the executor's timeout bounds what the caller waits for (a timed-out call returns
ToolResult(ok=False, error="timeout ...") while its thread finishes in the background; a call that cannot start
because hung calls hold every worker is answered "not started" once the batch's bound has passed).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from align.tools.base import ToolResult


@dataclass
class Call:
    """One tool call: tool name (any registered name or alias), its input and the sample as context."""

    name: str
    input: str
    context: dict | None = field(default=None)


def _as_call(c) -> Call:
    if isinstance(c, Call):
        return c
    if isinstance(c, dict):
        return Call(c.get("name") or c.get("action") or "", c.get("input", c.get("action_input", "")), c.get("context"))
    if isinstance(c, (tuple, list)) and len(c) in (2, 3):
        return Call(c[0], c[1], c[2] if len(c) == 3 else None)
    raise TypeError(f"a tool call is Call, (name, input[, context]) or a dict, got {type(c).__name__}")


class ResultCache:
    """Thread-safe LRU of successful results keyed by (canonical tool, input, context digest)."""

    def __init__(self, max_items: int = 10_000):
        self.max_items = max_items
        self._data: OrderedDict[str, ToolResult] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def key(name: str, input: str, context: dict | None) -> str:
        ctx = json.dumps(context or {}, sort_keys=True, default=str)
        return hashlib.sha256(f"{name}\x00{input}\x00{ctx}".encode()).hexdigest()

    def get(self, key: str) -> ToolResult | None:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return None

    def put(self, key: str, value: ToolResult) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.max_items:
                self._data.popitem(last=False)


class ToolExecutor:
    """run_batch(calls) -> list[ToolResult] in input order; `await arun_batch(calls)` from asyncio code."""

    def __init__(self, max_workers: int = 8, timeout_s: float = 30.0, cache: bool | ResultCache = False,
                 resolver=None):
        if max_workers < 1 or not timeout_s > 0:
            raise ValueError("ToolExecutor needs max_workers >= 1 and timeout_s > 0")
        self.max_workers, self.timeout_s = max_workers, timeout_s
        self.cache = cache if isinstance(cache, ResultCache) else (ResultCache() if cache else None)
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="tool")
        if resolver is None:
            from align.tools.catalog import TOOLS, get_tool

            resolver = (get_tool, TOOLS.resolve)
        self._get_tool, self._canonical = resolver

    def _run_one(self, call: Call, started: list) -> ToolResult:
        started.append(time.monotonic())
        try:
            tool = self._get_tool(call.name)
        except KeyError as exc:
            return ToolResult(False, "", str(exc), 0.0)
        return tool(call.input, call.context)

    def _cache_key(self, call: Call) -> str | None:
        if self.cache is None:
            return None
        try:
            name = self._canonical(call.name.strip())
        except KeyError:
            return None
        return ResultCache.key(name, call.input, call.context)

    def run_batch(self, calls) -> list[ToolResult]:
        calls = [_as_call(c) for c in calls]
        results: list[ToolResult | None] = [None] * len(calls)
        pending: dict[Future, tuple[int, str | None, list]] = {}
        for i, call in enumerate(calls):
            key = self._cache_key(call)
            hit = self.cache.get(key) if key else None
            if hit is not None:
                results[i] = hit
                continue
            started: list = []
            pending[self._pool.submit(self._run_one, call, started)] = (i, key, started)
        # the whole batch is bounded too: hung calls hold their workers forever (threads cannot be killed), so a
        # call queued behind them would never start and never time out; past this bound it is answered not started
        rounds = -(-len(pending) // self.max_workers) + 1
        deadline = time.monotonic() + self.timeout_s * rounds
        while pending:
            done, _ = wait(list(pending), timeout=0.05, return_when=FIRST_COMPLETED)
            for fut in done:
                i, key, _ = pending.pop(fut)
                try:
                    res = fut.result()
                except Exception as exc:  # Tool.__call__ never raises; a custom callable might
                    res = ToolResult(False, "", f"{type(exc).__name__}: {exc}", 0.0)
                if key and res.ok:
                    self.cache.put(key, res)
                results[i] = res
            now = time.monotonic()
            for fut, (i, key, started) in list(pending.items()):
                if started and now - started[0] > self.timeout_s:
                    pending.pop(fut)
                    results[i] = ToolResult(False, "", f"timeout after {self.timeout_s:g}s", now - started[0])
                elif not started and now > deadline:
                    pending.pop(fut)
                    fut.cancel()
                    results[i] = ToolResult(False, "", f"not started within {self.timeout_s * rounds:g}s: every tool "
                                                       f"worker ({self.max_workers}) is busy, some with hung calls", 0.0)
        return results  # type: ignore[return-value]

    async def arun_batch(self, calls) -> list[ToolResult]:
        """Asyncio variant: the batch runs in the pool without blocking the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.run_batch, list(calls))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["Call", "ResultCache", "ToolExecutor"]
