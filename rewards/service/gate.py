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

        try:
            await self._handle(scope, receive, send_tracking, path)
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
        limit = self.settings.max_body_bytes
        declared = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        too_big = declared is not None and declared.isdigit() and int(declared) > limit
        body, more = bytearray(), True
        drain_cap = max(limit * 4, 1 << 20)
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            if not too_big:
                body.extend(chunk)
                too_big = len(body) > limit
            else:
                drain_cap -= len(chunk)
                if drain_cap < 0:
                    break  # stop reading; the connection closes after the reply
            more = message.get("more_body", False)
        if too_big:
            await self._reply(send, _error(413, f"request body over {limit} bytes; split the batch into smaller requests"), scope)
            return
        if self.counters["in_flight"] >= self.settings.max_concurrency:
            await self._reply(send, _error(429, f"more than {self.settings.max_concurrency} requests in flight; retry later",
                                           {"Retry-After": "1"}), scope)
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        self.counters["in_flight"] += 1
        self.metrics.in_flight.set(self.counters["in_flight"])
        try:
            await self.app(scope, replay, send)
        finally:
            self.counters["in_flight"] -= 1
            self.metrics.in_flight.set(self.counters["in_flight"])
