"""The service's wire format: request / response models (pydantic), error bodies and NaN-safe JSON."""
from __future__ import annotations

import json
import math
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    service split the response off (by the prefix rule of align.rewards.service.openrlhf: a BOS before the
    prompt or a truncated prompt is tolerated); `labels` reach the reward as the `label` column."""

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
        if self.labels is not None and len(self.labels) != n:
            raise ValueError(f"labels has {len(self.labels)} items and query {n}")
        return self


class GetRewardResponse(BaseModel):
    rewards: list[float] = Field(description="Numbers only: an errored sample fails the batch (500) unless the "
                                             "service runs with on_error value:X, which fills X.")
    scores: list[float]
    extra_logs: dict[str, list[float] | list[str]] = Field(
        description="reward_error: 1.0 for each filled sample; trace (serve --trace-chars N): each sample's "
                    "reward trace, at most N chars")
    errors: list[str | None]
    errors_filled: int = Field(description="How many samples errored and were filled with on_error's value")
    request_id: str


class ErrorResponse(BaseModel):
    detail: Any


_ERROR_RESPONSES = {code: {"model": ErrorResponse, "description": text} for code, text in {
    400: "Malformed JSON", 401: "Missing or wrong bearer token", 413: "Body or batch too large",
    422: "Invalid request (types, lengths)", 429: "Too many requests in flight",
    500: "The reward raised, or (/get_reward, on_error fail) a sample errored", 503: "Batching queue full",
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
