"""uvicorn's h11 protocol with what uvicorn 0.54 lacks: read deadlines and a connection cap that frees sockets.

What uvicorn has, and why it is not enough (read in uvicorn/protocols/http/h11_impl.py):
- `timeout_keep_alive` is armed only after a response, so a connection that never sends a request, or sends
  its headers or body one byte at a time, is kept forever (the red team held 64 bodies of 7.5 MB open);
- `limit_concurrency` answers 503 to new *requests* once that many connections are open, but never closes a
  connection, so idle sockets still pile up until accept() fails with EMFILE, and asyncio then logs a
  traceback per failed accept (the red team's log grew 64 MB in 5 s);
- `h11_max_incomplete_event_size` (16 KiB by default) does bound one request's headers, and `backlog` bounds
  how many connections one accept burst takes: both are used as they are.

So each connection here has one deadline per phase: the headers within `header_timeout_s` of the connection
opening (or of the first byte of a later request), the whole body within `body_timeout_s` of the headers. A
missed deadline answers 408 and closes. At `max_connections` a new connection closes the longest-idle one (no
request in the app: never sent one, between requests, or still sending headers); when every connection has
a request in the app, the new one gets 503 and is closed.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from align.rewards.service.batching import _Metrics

if TYPE_CHECKING:
    from align.rewards.service.settings import ServiceSettings

log = logging.getLogger("align.rewards.service")


def _raw_reply(status: int, reason: str, detail: str, extra: str = "") -> bytes:
    body = ('{"detail":"%s"}' % detail).encode("ascii")
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n{extra}"
            f"content-length: {len(body)}\r\n\r\n").encode("ascii") + body


class _Connections:
    """The open connections of one server, and which of them are idle (oldest first)."""

    def __init__(self, settings: "ServiceSettings", metrics: _Metrics):
        self.settings, self.metrics = settings, metrics
        self.open: set[GuardedH11Protocol] = set()
        self.idle: OrderedDict[GuardedH11Protocol, None] = OrderedDict()

    def closed(self, conn: "GuardedH11Protocol", reason: str) -> None:
        self.open.discard(conn)
        self.idle.pop(conn, None)
        self.metrics.connections.set(len(self.open))
        if reason:
            self.metrics.connections_closed.labels(reason).inc()


class GuardedH11Protocol(H11Protocol):
    """Set `registry` on a subclass (`guarded_protocol` does) before uvicorn builds connections."""

    registry: _Connections

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        reg, s = self.registry, self.registry.settings
        self._phase: str | None = None
        self._timer = None
        self._fresh = True  # no request seen yet: the header deadline runs from the connection opening
        if len(reg.open) >= s.max_connections:
            victim = next(iter(reg.idle), None)
            if victim is None:
                log.warning("connection refused: %d connections are open, each with a request in the app "
                            "(max_connections %d)", len(reg.open), s.max_connections)
                self._close(_raw_reply(503, "Service Unavailable", f"over {s.max_connections} connections; retry later",
                                       "retry-after: 1\r\n"), "cap_refused", registered=False)
                return
            victim._close(b"", "cap_evicted")
        reg.open.add(self)
        reg.metrics.connections.set(len(reg.open))
        self._sync()

    def connection_lost(self, exc) -> None:
        self._cancel_timer()
        self.registry.closed(self, "")
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._sync()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None:
            self._fresh = False

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._sync()

    # the deadlines ------------------------------------------------------------------------------------------

    def _busy(self) -> bool:
        """A request is in the app (its body may still be arriving): not evictable."""
        return self.cycle is not None and not self.cycle.response_complete

    def _current_phase(self) -> str | None:
        their = self.conn.their_state
        if their is h11.SEND_BODY:
            return "body"
        if their is h11.IDLE and self.conn.our_state is h11.IDLE and (self._fresh or self.conn.trailing_data[0]):
            return "headers"
        return None  # the request is in the app, or the connection idles between requests (keep_alive_s)

    def _sync(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        reg = self.registry
        if self._busy():
            reg.idle.pop(self, None)
        elif self not in reg.idle:
            reg.idle[self] = None
        phase = self._current_phase()
        if phase == self._phase:
            return  # a deadline runs from the start of its phase, not from the last byte (slowloris)
        self._cancel_timer()
        self._phase = phase
        if phase is not None:
            limit = reg.settings.header_timeout_s if phase == "headers" else reg.settings.body_timeout_s
            self._timer = self.loop.call_later(limit, self._expire, phase, limit)

    def _cancel_timer(self) -> None:
        if getattr(self, "_timer", None) is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, phase: str, limit: float) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        log.warning("closed a connection: its request %s did not arrive within %gs", phase, limit)
        reply = b"" if self.cycle is not None and self.cycle.response_started else _raw_reply(
            408, "Request Timeout", f"the request {phase} did not arrive within {limit:g}s")
        if self._fresh and not self.conn.trailing_data[0]:
            reply = b""  # it never sent a byte: nothing to answer
        self._close(reply, f"{phase}_timeout")

    def _close(self, reply: bytes, reason: str, registered: bool = True) -> None:
        self._cancel_timer()
        if self.cycle is not None:
            self.cycle.keep_alive = False
        if registered:
            self.registry.closed(self, reason)
        else:
            self.registry.metrics.connections_closed.labels(reason).inc()
        if reply:
            self.transport.write(reply)
        self.transport.close()


def guarded_protocol(settings: "ServiceSettings", metrics: _Metrics) -> type[GuardedH11Protocol]:
    """A protocol class for one server (uvicorn.Config(http=...)): its own connection registry."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"registry": _Connections(settings, metrics)})
