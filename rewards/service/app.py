"""The FastAPI app: settings, the routes (/score, /get_reward, /health, /metrics) and their error mapping."""
from __future__ import annotations

import asyncio
import uuid
from contextlib import asynccontextmanager
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from align.errors import AlignError
from align.rewards.base import RewardOutput, as_reward_function
from align.rewards.service.batching import DynamicBatcher, QueueFull, ScoringFailed, _Metrics
from align.rewards.service.cache import _Idempotency
from align.rewards.service.gate import _Gate
from align.rewards.service.openrlhf import get_reward_body, parse_on_error, split_queries, trace_texts
from align.rewards.service.settings import ServiceSettings
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
from align.rewards.service.worker import RewardUnavailable

# ---------------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------------


def create_app(reward: Any, *, reward_factory: Callable[[], Any] | None = None, **settings: Any) -> FastAPI:
    """A FastAPI app serving `reward` (a RewardFunction or TRL-style callable). Run it with uvicorn, or `serve`
    (which also applies the connection limits). `settings` are ServiceSettings fields. `reward_factory` builds a
    replacement when a reward call is stuck (see DynamicBatcher); without it a stuck reward stays stuck."""
    reward = as_reward_function(reward)
    settings = ServiceSettings(**settings)
    metrics = _Metrics()
    batcher = DynamicBatcher(reward, settings.max_batch_size, settings.max_wait_ms / 1000.0,
                             settings.max_queue_samples, metrics, settings.reward_timeout_s, reward_factory)
    idempotency = _Idempotency(settings.idempotency_cache_size, settings.idempotency_cache_bytes)
    counters = {"in_flight": 0, "body_bytes": 0}
    fill = parse_on_error(settings.on_error)

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
        except (QueueFull, RewardUnavailable) as err:
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

        async def render() -> bytes:  # the cache keeps (and counts) the bytes sent, not the objects
            return SafeJSONResponse(await make()).body

        try:
            return Response(await idempotency.run(key, render), media_type="application/json")
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
        prompts, completions, split_errors = split_queries(body.query, body.prompts)
        columns = {} if body.labels is None else {"label": list(body.labels)}

        async def make() -> dict[str, Any]:
            # a query without its prompt in it is not scored: it is an errored sample (on_error says what then)
            keep = [i for i, e in enumerate(split_errors) if e is None]
            out = await _run_scoring([prompts[i] for i in keep], [completions[i] for i in keep],
                                     {k: [v[i] for i in keep] for k, v in columns.items()})
            scores: list[float | None] = [None] * len(split_errors)
            errors = list(split_errors)
            infos: list[Any] = [None] * len(split_errors)
            for j, i in enumerate(keep):
                scores[i], errors[i], infos[i] = out.scores[j], out.errors[j], out.info[j]
            traces = trace_texts(infos, settings.trace_chars) if settings.trace_chars else None
            reply = get_reward_body(scores, errors, fill, request_id, traces)
            if isinstance(reply, tuple):
                raise _HTTPReply(*reply)
            return reply

        return await _idempotent("/get_reward", body.request_id, make)

    @app.get("/health")
    async def health():
        """200 with status "ok", or 503 with status "stuck" (a reward call has run past reward_timeout_s) or
        "restarting" (the reward is being replaced); also the reward's name and the current load."""
        state = batcher.health()
        body = {**state, "reward": batcher.reward.name, "in_flight": counters["in_flight"],
                "queue_samples": batcher.queued_samples, "body_bytes": counters["body_bytes"]}
        return SafeJSONResponse(body, status_code=200 if state["status"] == "ok" else 503)

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
