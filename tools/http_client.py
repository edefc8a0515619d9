"""Shared HTTP client for tool backends: `requests` with retries, exponential backoff and timeouts."""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from align.tools.base import ToolError

_sessions: dict[tuple, object] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class HTTPConfig:
    """url: endpoint; api_key: secret (never logged). Values left empty are read from the named env vars."""

    url: str = ""
    api_key: str = ""
    url_env: str = ""
    key_env: str = ""
    timeout_s: float = 10.0
    retries: int = 3
    backoff_s: float = 0.5

    def __post_init__(self):
        if self.timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0:
            raise ValueError("HTTPConfig: timeout_s must be > 0 and retries, backoff_s >= 0")

    def resolved_url(self) -> str:
        return self.url or (os.environ.get(self.url_env, "") if self.url_env else "")

    def resolved_key(self) -> str:
        return self.api_key or (os.environ.get(self.key_env, "") if self.key_env else "")


def session(cfg: HTTPConfig):
    """A pooled requests.Session per (retries, backoff) retrying 429/5xx and connection errors."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    key = (cfg.retries, cfg.backoff_s, os.getpid())
    with _lock:
        if key not in _sessions:
            retry = Retry(total=cfg.retries, connect=cfg.retries, read=cfg.retries, backoff_factor=cfg.backoff_s,
                          status_forcelist=(429, 500, 502, 503, 504), allowed_methods=None,
                          respect_retry_after_header=True, raise_on_status=False)
            s = requests.Session()
            adapter = HTTPAdapter(max_retries=retry, pool_maxsize=32)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            _sessions[key] = s
        return _sessions[key]


def request_json(cfg: HTTPConfig, method: str, *, url: str | None = None, **kwargs) -> object:
    """Send one request (with retries) and return the decoded JSON; failures become ToolError."""
    import requests

    target = url or cfg.resolved_url()
    if not target:
        raise ToolError(f"no URL configured; set {cfg.url_env or 'the backend url'}")
    try:
        resp = session(cfg).request(method, target, timeout=cfg.timeout_s, **kwargs)
    except requests.RequestException as exc:
        raise ToolError(f"HTTP backend unreachable after {cfg.retries} retries: {type(exc).__name__}") from None
    if resp.status_code >= 400:
        raise ToolError(f"HTTP backend answered {resp.status_code}")
    try:
        return resp.json()
    except ValueError:
        raise ToolError("HTTP backend returned invalid JSON") from None


__all__ = ["HTTPConfig", "request_json", "session"]
