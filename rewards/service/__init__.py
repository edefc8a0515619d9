"""The reward scoring service: FastAPI + uvicorn + pydantic.

Endpoints: `POST /score` (native), `POST /get_reward` (OpenRLHF's remote-RM shape), `GET /health`,
`GET /metrics` (Prometheus text), `GET /openapi.json`.

What it guards against (OpenRLHF's serve_rm binds 0.0.0.0 without auth, scores inside the async handler and
turns one NaN into an HTTP 500 for the whole batch):
- auth: a bearer token, required by `serve` whenever the host is not loopback (401 without it);
- size: bodies over `max_body_bytes` get 413 (reading stops there), more than `max_samples_per_request`
  samples get 413, request bodies held together over `max_buffered_body_bytes` get 503;
- load: more than `max_concurrency` requests in flight get 429, a full batching queue 503, a batch that
  does not finish within `request_timeout_s` 504 (never a hang);
- connections (`protocol`): headers within `header_timeout_s`, bodies within `body_timeout_s` (else 408 and
  closed), at most `max_connections` open (the longest-idle one makes room);
- a stuck reward (a call past `reward_timeout_s`): /health answers 503 "stuck" / "restarting" and requests
  fail at once with 503 + Retry-After instead of queueing into timeouts;
- logs: each kind of line is rate-limited (`logs`), so a flood cannot fill the disk;
- dynamic batching: concurrent requests with the same columns are merged up to `max_batch_size` samples or
  `max_wait_ms`, scored in a worker thread (the event loop keeps serving), and split back;
- NaN / inf scores become per-sample errors (200 with `errors[i]`), never a 500;
- idempotency: a retried `request_id` is answered from an LRU of recent responses, bounded in entries and
  bytes (`cache`), or joins the in-flight one;
- privacy: payloads are never logged (only counts and latencies reach the logs and metrics).

Modules: `settings` (ServiceSettings), `wire` (request / response models), `batching` (DynamicBatcher, metrics),
`worker` (the reward's thread), `cache` (idempotency), `gate` (auth and body limits), `protocol` (connection
limits), `logs` (rate limit), `app` (create_app: the routes), `server` (check_bind, ServerThread, serve). Every
public name is importable from here.
"""
from __future__ import annotations

from align.rewards.service.app import create_app
from align.rewards.service.batching import DynamicBatcher, QueueFull, ScoringFailed
from align.rewards.service.logs import RateLimitFilter
from align.rewards.service.server import ServerThread, check_bind, is_loopback, serve
from align.rewards.service.settings import SETTING_NAMES, ServiceSettings
from align.rewards.service.wire import (
    PROTECTED_PATHS,
    SCORING_PATHS,
    ErrorResponse,
    GetRewardRequest,
    GetRewardResponse,
    SafeJSONResponse,
    ScoreRequest,
    ScoreResponse,
)
from align.rewards.service.worker import RewardUnavailable

__all__ = ["create_app", "serve", "ServerThread", "check_bind", "is_loopback", "ScoreRequest", "ScoreResponse", "GetRewardRequest",
           "GetRewardResponse", "DynamicBatcher", "ServiceSettings", "ErrorResponse", "SafeJSONResponse", "QueueFull",
           "ScoringFailed", "SCORING_PATHS", "PROTECTED_PATHS", "RewardUnavailable", "RateLimitFilter", "SETTING_NAMES"]
