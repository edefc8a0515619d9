"""The reward scoring service: FastAPI + uvicorn + pydantic.

Endpoints: `POST /score` (native), `POST /get_reward` (OpenRLHF's remote-RM shape), `GET /health`,
`GET /metrics` (Prometheus text), `GET /openapi.json`.

What it guards against (OpenRLHF's serve_rm binds 0.0.0.0 without auth, scores inside the async handler and
turns one NaN into an HTTP 500 for the whole batch):
- auth: a bearer token, required by `serve` whenever the host is not loopback (401 without it);
- size: bodies over `max_body_bytes` get 413, more than `max_samples_per_request` samples get 413;
- load: more than `max_concurrency` requests in flight get 429, a full batching queue 503, a batch that
  does not finish within `request_timeout_s` 504 (never a hang);
- dynamic batching: concurrent requests with the same columns are merged up to `max_batch_size` samples or
  `max_wait_ms`, scored in a worker thread (the event loop keeps serving), and split back;
- NaN / inf scores become per-sample errors (200 with `errors[i]`), never a 500;
- idempotency: a retried `request_id` is answered from an LRU of recent responses (or joins the in-flight one);
- privacy: payloads are never logged (only counts and latencies reach the logs and metrics).
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, model_validator

from align.errors import AlignError
from align.rewards.base import RewardFunction, RewardOutput, as_reward_function

log = logging.getLogger("align.rewards.service")

SCORING_PATHS = ("/score", "/get_reward")
PROTECTED_PATHS = (*SCORING_PATHS, "/metrics")
_RESERVED_COLUMNS = {"prompts", "completions", "self"}


# ---------------------------------------------------------------------------------------------------------
# Wire format
# ---------------------------------------------------------------------------------------------------------


class ScoreRequest(BaseModel):
    """N prompts and N completions; `metadata` holds dataset columns (each a list of N) passed to the reward."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[str]
    completions: list[str]
    metadata: dict[str, list[Any]] | None = None
    request_id: str | None = Field(default=None, min_length=1, max_length=128,
                                   description="Idempotency key: a retry with the same id gets the same answer.")

    @model_validator(mode="after")
    def _lengths(self) -> "ScoreRequest":
        n = len(self.completions)
        if len(self.prompts) != n:
            raise ValueError(f"prompts has {len(self.prompts)} items and completions {n}; send one prompt per completion")
        for key, values in (self.metadata or {}).items():
            if not key.isidentifier() or key in _RESERVED_COLUMNS or key.startswith("_"):
                raise ValueError(f"metadata column {key!r} is not allowed; use identifier names other than "
                                 "prompts / completions")
            if len(values) != n:
                raise ValueError(f"metadata column {key!r} has {len(values)} values for {n} completions")
        return self


class ScoreResponse(BaseModel):
    scores: list[float | None] = Field(description="One score per sample; null where the sample has an error or the reward does not apply.")
    errors: list[str | None]
    info: list[dict[str, Any]]
    token_rewards: list[list[float]] | None = None
    request_id: str


class GetRewardRequest(BaseModel):
    """OpenRLHF's remote reward-model request: `query` = prompt + response; `prompts` (optional) lets the
    service split the response off; `labels` reach the reward as the `label` column."""

    model_config = ConfigDict(extra="ignore")

    query: list[str]
    prompts: list[str] | None = None
    labels: list[Any] | None = None
    request_id: str | None = Field(default=None, min_length=1, max_length=128)

    @model_validator(mode="after")
    def _lengths(self) -> "GetRewardRequest":
        n = len(self.query)
        if self.prompts is not None:
            if len(self.prompts) != n:
                raise ValueError(f"prompts has {len(self.prompts)} items and query {n}")
            for i, (q, p) in enumerate(zip(self.query, self.prompts)):
                if not q.startswith(p):
                    raise ValueError(f"query[{i}] does not start with prompts[{i}]; send query = prompt + response")
        if self.labels is not None and len(self.labels) != n:
            raise ValueError(f"labels has {len(self.labels)} items and query {n}")
        return self


class GetRewardResponse(BaseModel):
    rewards: list[float | None]
    scores: list[float | None]
    extra_logs: dict[str, list[float]]
    errors: list[str | None]
    request_id: str


class ErrorResponse(BaseModel):
    detail: Any


_ERROR_RESPONSES = {code: {"model": ErrorResponse, "description": text} for code, text in {
    400: "Malformed JSON", 401: "Missing or wrong bearer token", 413: "Body or batch too large",
    422: "Invalid request (types, lengths)", 429: "Too many requests in flight", 503: "Batching queue full",
    504: "Scoring timed out"}.items()}


def _jsonable(value: Any, depth: int = 0) -> Any:
    """JSON-safe copy: non-finite floats -> None, unknown objects -> str, bounded depth."""
    if depth > 20:
        return None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return _jsonable(value.item(), depth + 1)
        except (TypeError, ValueError):
            pass
    return str(value)


class SafeJSONResponse(JSONResponse):
    """ASCII-escaped JSON that refuses NaN (lone surrogates and NaN can never turn a reply into a 500)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> SafeJSONResponse:
    return SafeJSONResponse({"detail": detail}, status_code=status, headers=headers)


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


# ---------------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ServiceSettings:
    max_batch_size: int = 64
    max_wait_ms: float = 5.0
    max_body_bytes: int = 8 * 1024 * 1024
    max_concurrency: int = 256
    max_queue_samples: int | None = None  # default 16 * max_batch_size
    max_samples_per_request: int = 4096
    request_timeout_s: float = 300.0
    idempotency_cache_size: int = 1024
    token: str | None = None

    def __post_init__(self) -> None:
        for key in ("max_batch_size", "max_body_bytes", "max_concurrency", "max_samples_per_request"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"service: {key} must be >= 1, got {getattr(self, key)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"service: max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"service: request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.max_queue_samples is None:
            self.max_queue_samples = max(16 * self.max_batch_size, self.max_samples_per_request)
        if self.token is not None and not self.token.strip():
            raise ValueError("service: token is empty; pass a non-empty --token or none on loopback")


def create_app(reward: Any, *, max_batch_size: int = 64, max_wait_ms: float = 5.0,
               max_body_bytes: int = 8 * 1024 * 1024, max_concurrency: int = 256, token: str | None = None,
               max_queue_samples: int | None = None, max_samples_per_request: int = 4096,
               request_timeout_s: float = 300.0, idempotency_cache_size: int = 1024) -> FastAPI:
    """A FastAPI app serving `reward` (a RewardFunction or TRL-style callable). Run it with uvicorn, or `serve`."""
    reward = as_reward_function(reward)
    settings = ServiceSettings(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_body_bytes=max_body_bytes,
                               max_concurrency=max_concurrency, max_queue_samples=max_queue_samples,
                               max_samples_per_request=max_samples_per_request, request_timeout_s=request_timeout_s,
                               idempotency_cache_size=idempotency_cache_size, token=token)
    metrics = _Metrics()
    batcher = DynamicBatcher(reward, settings.max_batch_size, settings.max_wait_ms / 1000.0,
                             settings.max_queue_samples, metrics)
    idempotency = _Idempotency(settings.idempotency_cache_size)
    counters = {"in_flight": 0}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="align reward service", version="1", lifespan=lifespan, default_response_class=SafeJSONResponse,
                  description=f"Scores (prompt, completion) pairs with the reward {reward.name!r}.")
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.batcher = batcher
    app.state.reward = reward

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error(400, "malformed JSON body")
        # never echo the payload back: keep only where and what
        slim = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))[:300], "type": e.get("type")} for e in errors[:20]]
        return SafeJSONResponse({"detail": slim}, status_code=422)

    async def _run_scoring(prompts: list[str], completions: list[str], columns: dict[str, list[Any]]) -> RewardOutput:
        if len(completions) > settings.max_samples_per_request:
            raise _HTTPReply(413, f"{len(completions)} samples in one request (max {settings.max_samples_per_request}); "
                                  "split the batch")
        try:
            out = await asyncio.wait_for(batcher.submit(prompts, completions, columns), settings.request_timeout_s)
        except QueueFull as err:
            raise _HTTPReply(503, f"{err}; retry later", {"Retry-After": "1"}) from None
        except asyncio.TimeoutError:
            raise _HTTPReply(504, f"scoring did not finish within {settings.request_timeout_s:g}s") from None
        except ScoringFailed as err:
            raise _HTTPReply(err.status, str(err)) from None
        metrics.samples.inc(len(out))
        metrics.sample_errors.inc(sum(e is not None for e in out.errors))
        return out

    async def _idempotent(path: str, request_id: str | None, make):
        key = None if request_id is None else (path, request_id)
        try:
            return SafeJSONResponse(await idempotency.run(key, make))
        except _HTTPReply as reply:
            return _error(reply.status, reply.detail, reply.headers)

    @app.post("/score", response_model=ScoreResponse, responses=_ERROR_RESPONSES)
    async def score(body: ScoreRequest):
        """Score N (prompt, completion) pairs; `metadata` columns (e.g. `label`, `tests`) reach the reward."""
        request_id = body.request_id or uuid.uuid4().hex

        async def make() -> dict[str, Any]:
            out = await _run_scoring(body.prompts, body.completions, dict(body.metadata or {}))
            return {"scores": out.scores, "errors": out.errors, "info": _jsonable(out.info),
                    "token_rewards": _jsonable(out.token_rewards), "request_id": request_id}

        return await _idempotent("/score", body.request_id, make)

    @app.post("/get_reward", response_model=GetRewardResponse, responses=_ERROR_RESPONSES)
    async def get_reward(body: GetRewardRequest):
        """OpenRLHF remote reward model: rewards for `query` (prompt + response)."""
        request_id = body.request_id or uuid.uuid4().hex
        if body.prompts is not None:
            prompts = list(body.prompts)
            completions = [q[len(p):] for q, p in zip(body.query, body.prompts)]
        else:
            prompts, completions = [""] * len(body.query), list(body.query)
        columns = {} if body.labels is None else {"label": list(body.labels)}

        async def make() -> dict[str, Any]:
            out = await _run_scoring(prompts, completions, columns)
            return {"rewards": out.scores, "scores": out.scores,
                    "extra_logs": {"reward_error": [0.0 if e is None else 1.0 for e in out.errors]},
                    "errors": out.errors, "request_id": request_id}

        return await _idempotent("/get_reward", body.request_id, make)

    @app.get("/health")
    async def health():
        """Liveness: the reward's name and the current load."""
        return {"status": "ok", "reward": reward.name, "in_flight": counters["in_flight"],
                "queue_samples": batcher.queued_samples}

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics():
        """Prometheus text format."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(_Gate, settings=settings, metrics=metrics, counters=counters)
    return app


class _HTTPReply(AlignError):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to expose the service beyond loopback without a token (one line, names the fix)."""
    if not is_loopback(host) and not token:
        raise ValueError(f"refusing to serve rewards on {host} without a token; pass --token TOKEN "
                         "(or bind --host 127.0.0.1)")


class ServerThread:
    """Runs an app with uvicorn in a background thread (tests, notebooks, the CPU demo):
    `with ServerThread(create_app(reward)) as url: ...`. port=0 picks a free port."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port = host, port
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                                    lifespan="on"))
        self.thread = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> str:
        import threading

        self.thread = threading.Thread(target=self.server.run, daemon=True, name="reward-service")
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the reward service did not start on {self.url}")
            time.sleep(0.01)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(10)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(reward: Any, host: str = "127.0.0.1", port: int = 8000, token: str | None = None, *,
          log_level: str = "info", access_log: bool = False, **app_kwargs: Any) -> None:
    """Serve `reward` with uvicorn until interrupted. app_kwargs go to `create_app`."""
    import uvicorn

    check_bind(host, token)
    reward = as_reward_function(reward)
    app = create_app(reward, token=token, **app_kwargs)
    log.info("serving reward %r on http://%s:%d (auth %s)", reward.name, host, port, "on" if token else "off")
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log)
    finally:
        reward.close()


__all__ = ["create_app", "serve", "ServerThread", "check_bind", "is_loopback", "ScoreRequest", "ScoreResponse", "GetRewardRequest",
           "GetRewardResponse", "DynamicBatcher", "ServiceSettings"]
