"""Dynamic batching: concurrent requests merged into batches scored in a worker thread; metrics; idempotency."""
from __future__ import annotations

import asyncio
import math
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from align.errors import AlignError
from align.rewards.base import RewardFunction, RewardOutput

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
    `max_wait_s` for the batch to fill) and scores each batch in one worker thread."""

    def __init__(self, reward: RewardFunction, max_batch_size: int, max_wait_s: float, max_queue_samples: int,
                 metrics: _Metrics):
        self.reward = reward
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_samples = max_queue_samples
        self.metrics = metrics
        self.pending: deque[_Entry] = deque()
        self.queued_samples = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        # one thread: a reward model scores one batch at a time, off the event loop
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-score")

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
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, prompts: list[str], completions: list[str], columns: dict[str, list[Any]]) -> RewardOutput:
        n = len(completions)
        if n == 0:
            return RewardOutput(scores=[])
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
        loop = asyncio.get_running_loop()
        live = [e for e in batch if not e.future.done()]
        if not live:
            return
        prompts = [p for e in live for p in e.prompts]
        completions = [c for e in live for c in e.completions]
        columns = {k: [v for e in live for v in e.columns[k]] for k in live[0].key}
        self.metrics.batch_size.observe(len(completions))
        try:
            out = await loop.run_in_executor(self.executor, self._call, prompts, completions, columns)
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
        start = 0
        for e in live:
            if not e.future.done():
                e.future.set_result(_slice(out, start, start + e.n))
            start += e.n


class _Idempotency:
    """request_id -> finished response (LRU), or the in-flight future a retry should join."""

    def __init__(self, size: int):
        self.size = size
        self.done: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self.running: dict[tuple[str, str], asyncio.Future] = {}

    async def run(self, key: tuple[str, str] | None, make):
        if key is None or self.size <= 0:
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
        self.done[key] = result
        while len(self.done) > self.size:
            self.done.popitem(last=False)
        return result
