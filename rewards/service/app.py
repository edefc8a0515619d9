"""The FastAPI app: settings, the routes (/score, /get_reward, /health, /metrics) and their error mapping."""
from __future__ import annotations

import asyncio
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from align.errors import AlignError
from align.rewards.base import RewardOutput, as_reward_function
from align.rewards.service.batching import DynamicBatcher, QueueFull, ScoringFailed, _Idempotency, _Metrics
from align.rewards.service.gate import _Gate
from align.rewards.service.wire import (
    _ERROR_RESPONSES,
    GetRewardRequest,
    GetRewardResponse,
    SafeJSONResponse,
    ScoreRequest,
    ScoreResponse,
    _error,
    _jsonable,
)

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
