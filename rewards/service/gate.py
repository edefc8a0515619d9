"""The gate: auth, body size, concurrency and request metrics, before FastAPI parses anything."""
from __future__ import annotations

import hmac
import time
from typing import TYPE_CHECKING

from fastapi.responses import Response

from align.rewards.service.batching import _Metrics
from align.rewards.service.wire import PROTECTED_PATHS, SCORING_PATHS, _error

if TYPE_CHECKING:  # app.py builds the gate
    from align.rewards.service.app import ServiceSettings


# ---------------------------------------------------------------------------------------------------------
# The gate: auth, body size, concurrency and request metrics, before FastAPI parses anything
# ---------------------------------------------------------------------------------------------------------

class _Gate:
    def __init__(self, app, settings: "ServiceSettings", metrics: _Metrics, counters: dict[str, int]):
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.counters = counters

    async def _reply(self, send, response: Response, scope) -> None:
        await response(scope, None, send)

    def _authorised(self, scope) -> bool:
        token = self.settings.token
        if not token:
            return True
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, given = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
        return False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        started = time.perf_counter()
        status_box = {"status": 500}

        async def send_tracking(message) -> None:
            if message["type"] == "http.response.start":
                status_box["status"] = message["status"]
            await send(message)

        async def receive_tracking():
            message = await receive()
            if message["type"] == "http.disconnect" and status_box["status"] == 500:
                status_box["status"] = 499  # the client left (or a read timeout closed it) before an answer
            return message

        try:
            await self._handle(scope, receive_tracking, send_tracking, path)
        finally:
            label = path if path in (*PROTECTED_PATHS, "/health", "/openapi.json") else "other"
            self.metrics.requests.labels(label, str(status_box["status"])).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - started)

    async def _handle(self, scope, receive, send, path) -> None:
        if path in PROTECTED_PATHS and not self._authorised(scope):
            await self._reply(send, _error(401, "missing or wrong bearer token; send 'Authorization: Bearer <token>'",
                                           {"WWW-Authenticate": "Bearer"}), scope)
            return
        if path not in SCORING_PATHS or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if await self._over_concurrency(scope, send):  # before reading: a body we would refuse is not read
            return
        held = [0]  # body bytes counted in counters["body_bytes"] for this request, released when it is answered
        try:
            body = await self._read_body(scope, receive, send, held)
            if body is None or await self._over_concurrency(scope, send):
                return
            await self._dispatch(scope, receive, send, body)
        finally:
            self.counters["body_bytes"] -= held[0]

    async def _over_concurrency(self, scope, send) -> bool:
        if self.counters["in_flight"] < self.settings.max_concurrency:
            return False
        await self._reply(send, _error(429, f"more than {self.settings.max_concurrency} requests in flight; retry later",
                                       {"Retry-After": "1"}), scope)
        return True

    async def _read_body(self, scope, receive, send, held: list[int]) -> bytes | None:
        """The body, counted against max_body_bytes and max_buffered_body_bytes while it is read: reading stops
        at the first chunk over either (413 / 503 with `Connection: close`, so the rest is never read); then the
        estimate of its parsed objects is charged too. None: answered already (or the client left)."""
        limit, budget = self.settings.max_body_bytes, self.settings.max_buffered_body_bytes
        declared = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        too_big = _error(413, f"request body over {limit} bytes; split the batch into smaller requests",
                         {"Connection": "close"})
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._reply(send, too_big, scope)
            return None
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            if len(body) + len(chunk) > limit:
                await self._reply(send, too_big, scope)
                return None
            if self.counters["body_bytes"] + len(chunk) > budget:
                await self._reply(send, _error(
                    503, f"the service holds {self.counters['body_bytes']} bytes of request bodies "
                         f"(max_buffered_body_bytes {budget}); retry later", {"Connection": "close", "Retry-After": "1"}),
                    scope)
                return None
            body.extend(chunk)
            self.counters["body_bytes"] += len(chunk)
            held[0] += len(chunk)
            more = message.get("more_body", False)
        # Parsed JSON can take 25x its bytes (8 MiB of `[],` measured 200 MB), so the objects are charged too,
        # before parsing: 64 bytes per value separator or container, a Python list / dict / float / str + its
        # pointer (over-counting the commas and brackets inside strings only makes the charge conservative).
        parsed = 64 * (body.count(b",") + body.count(b"[") + body.count(b"{"))
        if held[0] + parsed > budget:
            await self._reply(send, _error(413, f"request body would take ~{(held[0] + parsed) >> 20} MiB parsed "
                                                f"(max_buffered_body_bytes {budget}); send fewer values per request",
                                           {"Connection": "close"}), scope)
            return None
        if self.counters["body_bytes"] + parsed > budget:
            await self._reply(send, _error(
                503, f"the service holds {self.counters['body_bytes']} bytes of request bodies and their parsed objects "
                     f"(max_buffered_body_bytes {budget}); retry later", {"Retry-After": "1"}), scope)
            return None
        self.counters["body_bytes"] += parsed
        held[0] += parsed
        return bytes(body)

    async def _dispatch(self, scope, receive, send, body: bytes) -> None:
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        self.counters["in_flight"] += 1
        self.metrics.in_flight.set(self.counters["in_flight"])
        try:
            await self.app(scope, replay, send)
        finally:
            self.counters["in_flight"] -= 1
            self.metrics.in_flight.set(self.counters["in_flight"])
