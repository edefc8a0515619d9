"""Dynamic batching: concurrent requests merged into batches scored in a worker thread; metrics; idempotency."""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from align.errors import AlignError
from align.rewards.base import RewardFunction, RewardOutput, as_reward_function
from align.rewards.service.worker import RewardUnavailable, _Worker

log = logging.getLogger("align.rewards.service")

# ---------------------------------------------------------------------------------------------------------
# Metrics and state
# ---------------------------------------------------------------------------------------------------------


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("reward_requests", "HTTP requests by path and status", ["path", "status"], registry=r)
        self.samples = Counter("reward_samples", "Samples scored", registry=r)
        self.sample_errors = Counter("reward_sample_errors", "Samples answered with an error", registry=r)
        self.latency = Histogram("reward_request_latency_seconds", "Request latency", ["path"], registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.batch_size = Histogram("reward_batch_size", "Samples per scored batch", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
        self.queue_depth = Gauge("reward_queue_samples", "Samples waiting to be batched", registry=r)
        self.in_flight = Gauge("reward_requests_in_flight", "Scoring requests in flight", registry=r)
        self.batch_failures = Counter("reward_batch_failures", "Batches whose reward raised", registry=r)
        self.stuck_calls = Counter("reward_stuck_calls", "Reward calls abandoned after reward_timeout_s", registry=r)
        self.restarts = Counter("reward_restarts", "Rewards replaced after a stuck call", registry=r)
        self.connections = Gauge("reward_connections_open", "Open HTTP connections", registry=r)
        self.connections_closed = Counter("reward_connections_closed", "Connections the service closed, by reason",
                                          ["reason"], registry=r)


class QueueFull(AlignError):
    pass


class ScoringFailed(AlignError):
    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


@dataclass
class _Entry:
    key: tuple[str, ...]
    prompts: list[str]
    completions: list[str]
    columns: dict[str, list[Any]]
    future: asyncio.Future
    n: int = field(init=False)

    def __post_init__(self) -> None:
        self.n = len(self.completions)


def _merge(outputs: list[RewardOutput]) -> RewardOutput:
    if len(outputs) == 1:
        return outputs[0]
    has_tokens = any(o.token_rewards is not None for o in outputs)
    return RewardOutput(
        scores=[s for o in outputs for s in o.scores], errors=[e for o in outputs for e in o.errors],
        info=[i for o in outputs for i in o.info],
        token_rewards=[t for o in outputs for t in (o.token_rewards or [[] for _ in o.scores])] if has_tokens else None)


def _slice(out: RewardOutput, start: int, stop: int) -> RewardOutput:
    return RewardOutput(scores=out.scores[start:stop], errors=out.errors[start:stop], info=out.info[start:stop],
                        token_rewards=None if out.token_rewards is None else out.token_rewards[start:stop])


class DynamicBatcher:
    """Merges concurrent requests into batches of up to `max_batch_size` samples (waiting at most
    `max_wait_s` for the batch to fill) and scores each batch in one worker thread.

    A reward call running longer than `call_timeout_s` is stuck: its batch fails (504), the waiting requests
    and every new one fail at once (RewardUnavailable -> 503 + Retry-After) and the call is abandoned. With a
    `reward_factory` the stuck reward is closed (which may free the call) and a new one is built ("restarting");
    without one the service stays "stuck" until the call returns. `health()` says which."""

    def __init__(self, reward: RewardFunction, max_batch_size: int, max_wait_s: float, max_queue_samples: int,
                 metrics: _Metrics, call_timeout_s: float = 300.0,
                 reward_factory: Callable[[], Any] | None = None):
        self.reward = reward
        self.call_timeout_s = call_timeout_s
        self.reward_factory = reward_factory
        self.state = "ok"  # ok | stuck | restarting
        self.call_started: float | None = None  # time.monotonic() when the running reward call began
        self.stuck_since: float | None = None
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_samples = max_queue_samples
        self.metrics = metrics
        self.pending: deque[_Entry] = deque()
        self.queued_samples = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        # one thread: a reward model scores one batch at a time, off the event loop
        self.worker = _Worker()

    def health(self) -> dict[str, Any]:
        """status ok | stuck | restarting; `reward_call_s`: how long the running call has taken (null: none)."""
        now = time.monotonic()
        call_s = None if self.call_started is None else round(now - self.call_started, 3)
        state = self.state
        if state == "ok" and call_s is not None and call_s > self.call_timeout_s:
            state = "stuck"  # the timeout fires on the next loop turn; /health must not say ok meanwhile
        out = {"status": state, "reward_call_s": call_s, "reward_timeout_s": self.call_timeout_s}
        if self.stuck_since is not None:
            out["stuck_for_s"] = round(now - self.stuck_since, 3)
        return out

    def _unavailable(self) -> RewardUnavailable:
        since = 0.0 if self.stuck_since is None else time.monotonic() - self.stuck_since
        if self.state == "restarting":
            return RewardUnavailable(f"the reward is being restarted after a call stuck for over "
                                     f"{self.call_timeout_s:g}s ({since:.0f}s ago)")
        return RewardUnavailable(f"the reward has been stuck in one call for {since + self.call_timeout_s:.0f}s "
                                 f"(reward_timeout_s {self.call_timeout_s:g}); restart the service")

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for entry in self.pending:
            if not entry.future.done():
                entry.future.set_exception(ScoringFailed("the service is shutting down"))
        self.worker.stop()

    async def submit(self, prompts: list[str], completions: list[str], columns: dict[str, list[Any]]) -> RewardOutput:
        n = len(completions)
        if n == 0:
            return RewardOutput(scores=[])
        if self.health()["status"] != "ok":
            raise self._unavailable()
        if self.queued_samples + n > self.max_queue_samples:
            raise QueueFull(f"the batching queue holds {self.queued_samples} samples (max {self.max_queue_samples})")
        loop = asyncio.get_running_loop()
        key = tuple(sorted(columns))
        entries = []
        for start in range(0, n, self.max_batch_size):
            stop = min(start + self.max_batch_size, n)
            entries.append(_Entry(key, prompts[start:stop], completions[start:stop],
                                  {k: v[start:stop] for k, v in columns.items()}, loop.create_future()))
        self.pending.extend(entries)
        self.queued_samples += n
        self.metrics.queue_depth.set(self.queued_samples)
        self._wakeup.set()
        return _merge(list(await asyncio.gather(*(e.future for e in entries))))

    def _ready(self, key: tuple[str, ...]) -> int:
        return sum(e.n for e in self.pending if e.key == key)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            key = self.pending[0].key
            deadline = loop.time() + self.max_wait_s
            while self._ready(key) < self.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch, total, keep = [], 0, deque()
            while self.pending:
                entry = self.pending.popleft()
                if entry.key == key and total + entry.n <= self.max_batch_size:
                    batch.append(entry)
                    total += entry.n
                else:
                    keep.append(entry)
            self.pending = keep
            self.queued_samples -= total
            self.metrics.queue_depth.set(self.queued_samples)
            await self._score(batch)

    def _call(self, prompts, completions, columns) -> RewardOutput:
        out = self.reward.score(prompts, completions, **columns)
        if not isinstance(out, RewardOutput) or len(out) != len(completions):
            raise ScoringFailed(f"reward returned {len(out) if isinstance(out, RewardOutput) else type(out).__name__} "
                                f"results for {len(completions)} samples")
        for i, row in enumerate(out.token_rewards or []):
            # a non-finite token reward makes the sample an error, like a non-finite score
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in row):
                out.scores[i], out.token_rewards[i] = None, []
                out.errors[i] = out.errors[i] or "non-finite token reward"
        return out

    async def _score(self, batch: list[_Entry]) -> None:
        live = [e for e in batch if not e.future.done()]
        if not live:
            return
        prompts = [p for e in live for p in e.prompts]
        completions = [c for e in live for c in e.completions]
        columns = {k: [v for e in live for v in e.columns[k]] for k in live[0].key}
        self.metrics.batch_size.observe(len(completions))
        call = self.worker.submit(self._call, prompts, completions, columns)
        self.call_started = time.monotonic()
        try:
            out = await asyncio.wait_for(asyncio.shield(call), self.call_timeout_s)
        except asyncio.TimeoutError:
            await self._recover(call, live)
            return
        except Exception as err:  # noqa: BLE001 - isolate the request that breaks the reward
            self.metrics.batch_failures.inc()
            if len(live) > 1:
                for e in live:
                    await self._score([e])
                return
            # ValueError / KeyError: the reward rejects this request's data (e.g. a missing label column): 422.
            # Anything else is the reward's own failure: 500 (the client may retry).
            rejected = isinstance(err, (ValueError, KeyError)) and not isinstance(err, ScoringFailed)
            status = 422 if rejected else 500
            what = "the reward rejected the request" if rejected else "the reward raised"
            live[0].future.done() or live[0].future.set_exception(
                ScoringFailed(f"{what}: {type(err).__name__}: {err}"[:500], status))
            return
        finally:
            self.call_started = None
        start = 0
        for e in live:
            if not e.future.done():
                e.future.set_result(_slice(out, start, start + e.n))
            start += e.n

    async def _recover(self, call: asyncio.Future, live: list[_Entry]) -> None:
        """A call overran call_timeout_s: fail its batch and the queue now, then replace (or wait for) the reward."""
        self.state, self.stuck_since = "stuck", self.call_started
        self.metrics.stuck_calls.inc()
        log.error("reward %r: a call of %d samples did not return within %gs; %s", self.reward.name,
                  sum(e.n for e in live), self.call_timeout_s,
                  "restarting it" if self.reward_factory else "refusing requests until it returns")
        for e in live:
            e.future.done() or e.future.set_exception(ScoringFailed(
                f"the reward did not return within reward_timeout_s={self.call_timeout_s:g}s", 504))
        self._fail_pending()
        self.worker.stop()  # the stuck thread exits if its call ever returns
        if self.reward_factory is None:
            try:
                await call  # nothing else may call this reward meanwhile; requests get 503 at once
            except Exception:  # noqa: BLE001 - the batch was already answered
                pass
        else:
            self.state = "restarting"
            await self._replace()
        self.worker = _Worker()
        self.state, self.stuck_since = "ok", None

    async def _replace(self) -> None:
        old = self.reward
        # close() kills the reward's children (sympy, sandboxes), which may free the stuck call; never awaited
        threading.Thread(target=_close_quietly, args=(old,), daemon=True, name="reward-close").start()
        delay = 1.0
        while True:
            builder = _Worker("reward-restart")
            try:
                new = as_reward_function(await builder.submit(self.reward_factory))
                if new is old:  # the factory hands back the stuck object itself: there is nothing to replace it with
                    raise ScoringFailed("reward_factory returned the stuck reward itself; it must build a new one")
                self.reward = new
                self.metrics.restarts.inc()
                log.warning("reward %r restarted", self.reward.name)
                return
            except Exception as err:  # noqa: BLE001 - keep refusing (503) and try again
                log.error("restarting reward %r failed: %s: %s; retrying in %gs", old.name, type(err).__name__,
                          str(err)[:300], delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 30.0)
            finally:
                builder.stop()

    def _fail_pending(self) -> None:
        error = self._unavailable()
        for entry in self.pending:
            entry.future.done() or entry.future.set_exception(error)
        self.pending.clear()
        self.queued_samples = 0
        self.metrics.queue_depth.set(0)


def _close_quietly(reward: RewardFunction) -> None:
    try:
        reward.close()
    except Exception as err:  # noqa: BLE001 - a broken reward being replaced
        log.warning("closing the stuck reward raised %s: %s", type(err).__name__, err)
