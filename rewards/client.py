"""RemoteReward: a RewardFunction that scores through the HTTP reward service (`align serve-rewards`).

Every logical request carries a `request_id` (uuid) that stays the same across retries, so the server answers
a retry from its idempotency cache instead of scoring twice. Retries happen only on connection errors,
timeouts, 5xx and 429, with bounded exponential backoff; after the last one RemoteReward raises
RemoteRewardError. It never returns zeros or an empty list in place of scores (OpenRLHF's client silently
leaves the reward empty after its retries).
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any

from align.errors import AlignError, UserError
from align.rewards.base import RewardFunction, RewardOutput

log = logging.getLogger(__name__)

RETRY_STATUSES = {429, 500, 502, 503, 504}
TOKEN_ENV = "ALIGN_REWARD_TOKEN"


class RemoteRewardError(AlignError, RuntimeError):
    """The reward service could not score a batch (after retries, or it rejected the request)."""


class RemoteRewardAuthError(UserError, RemoteRewardError):
    """The service refused the token (401): a setting the user fixes, so one line, no traceback."""


class RemoteReward(RewardFunction):
    """Scores with a remote reward service: `RemoteReward("http://127.0.0.1:8000", token="...")`; without a
    token, `$ALIGN_REWARD_TOKEN` is used when set.

    url: the service's base URL (`/score` is appended). Dataset columns go as `metadata` (except
    `drop_columns`, by default the trainer's `completion_ids`). Batches over
    `batch_size` samples are sent as several requests. `max_retries` retries (so max_retries + 1 attempts) with
    backoff `backoff_s * 2**k` capped at `max_backoff_s` (a server's Retry-After is honoured up to that cap).
    """

    name = "remote"

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 30.0, max_retries: int = 3,
                 backoff_s: float = 0.5, max_backoff_s: float = 10.0, batch_size: int = 256, name: str | None = None,
                 drop_columns: tuple[str, ...] = ("completion_ids", "trainer_state")):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"RemoteReward: url must start with http:// or https://, got {url!r}")
        if timeout_s <= 0 or max_retries < 0 or backoff_s < 0 or batch_size < 1:
            raise ValueError("RemoteReward: need timeout_s > 0, max_retries >= 0, backoff_s >= 0 and batch_size >= 1")
        self.url = url.rstrip("/")
        # no token given: $ALIGN_REWARD_TOKEN, the variable `align serve-rewards` reads too (keeps it out of configs)
        self.token = token or os.environ.get(TOKEN_ENV) or None
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.batch_size = batch_size
        self.name = name or "remote"
        # the trainer's token ids mean nothing to a service with its own tokenizer: not sent by default
        self.drop_columns = tuple(drop_columns)
        self._session = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_session"] = None  # sessions hold sockets; each process opens its own
        return state

    def __repr__(self) -> str:  # never print the token
        return f"RemoteReward(url={self.url!r}, token={'***' if self.token else None})"

    @property
    def session(self):
        if self._session is None:
            import requests

            self._session = requests.Session()
        return self._session

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        delay = min(self.backoff_s * (2 ** attempt), self.max_backoff_s)
        if retry_after:
            try:
                delay = max(delay, min(float(retry_after), self.max_backoff_s))
            except ValueError:
                pass
        return delay

    def post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST with retries; `payload["request_id"]` is set once and reused on every attempt."""
        import requests

        payload = {**payload, "request_id": payload.get("request_id") or uuid.uuid4().hex}
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                resp = self.session.post(f"{self.url}{path}", json=payload, headers=self._headers(), timeout=self.timeout_s)
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
                last = f"{type(err).__name__}: {str(err)[:200]}"
            else:
                if resp.status_code == 200:
                    try:
                        return resp.json()
                    except ValueError:
                        last = "the service answered 200 with a body that is not JSON"
                elif resp.status_code in RETRY_STATUSES:
                    last = f"HTTP {resp.status_code}: {_detail(resp)}"
                    retry_after = resp.headers.get("Retry-After")
                elif resp.status_code == 401:  # one line naming the fix, printed as such by the CLI
                    raise RemoteRewardAuthError(
                        f"reward service {self.url} refused the bearer token (HTTP 401: "
                        f"{'no token was sent' if not self.token else 'the token is wrong'}); set reward.remote_token "
                        f"or ${TOKEN_ENV} to the token the service was started with")
                else:  # the request itself is wrong (400, 413, 422): retrying cannot help
                    raise RemoteRewardError(f"reward service {self.url}{path} rejected the request: "
                                            f"HTTP {resp.status_code}: {_detail(resp)}")
            if attempt < self.max_retries:
                delay = self._delay(attempt, retry_after)
                log.warning("reward service %s%s: %s; retry %d/%d in %.2fs", self.url, path, last, attempt + 1,
                            self.max_retries, delay)
                time.sleep(delay)
        raise RemoteRewardError(f"reward service {self.url}{path} failed after {self.max_retries + 1} attempts "
                                f"(request_id {payload['request_id']}): {last}")

    def score(self, prompts, completions, **columns) -> RewardOutput:
        n = len(completions)
        prompts = list(prompts) if prompts is not None else [""] * n
        if len(prompts) != n:
            raise ValueError(f"RemoteReward: {len(prompts)} prompts for {n} completions")
        columns = {k: list(v) for k, v in columns.items() if v is not None and k not in self.drop_columns}
        for key, values in columns.items():
            if len(values) != n:
                raise ValueError(f"RemoteReward: column {key!r} has {len(values)} values for {n} completions")
        outputs = []
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            payload: dict[str, Any] = {"prompts": [str(p) for p in prompts[start:stop]],
                                       "completions": [str(c) for c in completions[start:stop]]}
            if columns:
                payload["metadata"] = {k: v[start:stop] for k, v in columns.items()}
            data = self.post("/score", payload)
            try:
                out = RewardOutput(scores=list(data["scores"]), errors=list(data["errors"]), info=list(data["info"]),
                                   token_rewards=data.get("token_rewards"))
            except (KeyError, TypeError, ValueError) as err:
                raise RemoteRewardError(f"reward service {self.url} sent a malformed response: {err}") from None
            if len(out) != stop - start:
                raise RemoteRewardError(f"reward service {self.url} returned {len(out)} scores for {stop - start} samples")
            outputs.append(out)
        if not outputs:
            return RewardOutput(scores=[])
        if len(outputs) == 1:
            return outputs[0]
        has_tokens = any(o.token_rewards is not None for o in outputs)
        return RewardOutput(scores=[s for o in outputs for s in o.scores], errors=[e for o in outputs for e in o.errors],
                            info=[i for o in outputs for i in o.info],
                            token_rewards=[t for o in outputs for t in (o.token_rewards or [[] for _ in o.scores])]
                            if has_tokens else None)

    def health(self) -> dict[str, Any]:
        resp = self.session.get(f"{self.url}/health", timeout=self.timeout_s)
        resp.raise_for_status()
        return resp.json()

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None


def _detail(resp) -> str:
    try:
        detail = resp.json().get("detail")
    except (ValueError, AttributeError):
        detail = resp.text
    return str(detail)[:300]


__all__ = ["RemoteReward", "RemoteRewardAuthError", "RemoteRewardError"]
