"""Rate-limited logging for the service: a flood of connections or bad requests must not become a flood of log
lines (the red team grew the log by 64 MB in 5 s through asyncio's accept() traceback, one per failed accept).

A line's kind is its logger and its message template (`record.msg` before `%` formatting), so "Invalid HTTP
request received." from a thousand clients is one kind. Each kind may log `per_interval` lines per
`interval_s`; the rest are dropped and counted, and the next line of that kind after the interval says how many
were suppressed. Kinds are bounded too (`max_kinds`; beyond it new kinds share one budget), so a message that
formats its arguments itself cannot grow the filter's table.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

_OVERFLOW = ("", "(other messages)")
# uvicorn's own loggers, asyncio's (accept errors) and ours; the root logger's handlers get the filter too,
# so a reward's logger (align.rewards.*) is limited where it is written
SERVICE_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "asyncio", "align.rewards.service")


class RateLimitFilter(logging.Filter):
    def __init__(self, per_interval: int = 20, interval_s: float = 10.0, max_kinds: int = 1024,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.per_interval, self.interval_s, self.max_kinds, self.clock = per_interval, interval_s, max_kinds, clock
        self.windows: dict[tuple[str, str], list] = {}  # kind -> [window start, lines let through, lines dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        verdict = getattr(record, "_align_rate_limited", None)
        if verdict is not None:  # already judged (a logger's filter, then a handler's): judge once
            return verdict
        kind = (record.name, str(record.msg))
        if kind not in self.windows and len(self.windows) >= self.max_kinds:
            kind = _OVERFLOW
        now = self.clock()
        window = self.windows.get(kind)
        if window is None or now - window[0] >= self.interval_s:
            dropped = 0 if window is None else window[2]
            self.windows[kind] = [now, 1, 0]
            if dropped:
                record.msg, record.args = "%s [%d similar lines suppressed in the last %.0fs]", (
                    record.getMessage(), dropped, now - window[0])
            verdict = True
        elif window[1] < self.per_interval:
            window[1] += 1
            verdict = True
        else:
            window[2] += 1
            verdict = False
        record._align_rate_limited = verdict
        return verdict


def install_rate_limit(per_interval: int, interval_s: float) -> RateLimitFilter:
    """One filter on the service's loggers and on the handlers of the root and uvicorn loggers; returns it
    (remove_rate_limit undoes it)."""
    limiter = RateLimitFilter(per_interval, interval_s)
    for name in SERVICE_LOGGERS:
        logging.getLogger(name).addFilter(limiter)
    for name in ("", "uvicorn", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(limiter)
    return limiter


def remove_rate_limit(limiter: RateLimitFilter) -> None:
    for name in SERVICE_LOGGERS:
        logging.getLogger(name).removeFilter(limiter)
    for name in ("", "uvicorn", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            handler.removeFilter(limiter)
