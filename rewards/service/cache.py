"""The idempotency cache: request_id -> the finished response, bounded by entries AND by bytes.

The response is kept as the JSON bytes sent on the wire, never as the Python objects it was built from: a
dict of 4,096 `info` dicts costs ~10x its JSON size, and a byte count can only bound what it measures. The
red team filled the count-only cache to 1,352 MB with 150 requests (~7 GB at its 1,024-entry limit).
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Awaitable, Callable


class _Idempotency:
    """LRU of finished responses (`bytes`) under `max_entries` and `max_bytes`, plus the in-flight future a
    retry joins. A response larger than `max_bytes` is answered but not kept (a retry scores it again)."""

    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.done: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self.bytes = 0
        self.running: dict[tuple[str, str], asyncio.Future] = {}

    def _store(self, key: tuple[str, str], body: bytes) -> None:
        if len(body) > self.max_bytes:
            return
        self.done[key] = body
        self.bytes += len(body)
        while len(self.done) > self.max_entries or self.bytes > self.max_bytes:
            _, evicted = self.done.popitem(last=False)
            self.bytes -= len(evicted)

    async def run(self, key: tuple[str, str] | None, make: Callable[[], Awaitable[bytes]]) -> bytes:
        if key is None or self.max_entries <= 0 or self.max_bytes <= 0:
            return await make()
        if key in self.done:
            self.done.move_to_end(key)
            return self.done[key]
        if key in self.running:
            return await asyncio.shield(self.running[key])
        fut = asyncio.get_running_loop().create_future()
        self.running[key] = fut
        try:
            result = await make()
        except BaseException as err:
            fut.set_exception(err)
            fut.exception()  # mark retrieved
            raise
        finally:
            self.running.pop(key, None)
        fut.set_result(result)
        self._store(key, result)
        return result
