"""ServiceSettings: every limit of the scoring service in one validated place (docs/security.md, "Scoring
service limits", says what each one bounds and the RSS they add up to)."""
from __future__ import annotations

from dataclasses import dataclass, fields

from align.rewards.service.openrlhf import parse_on_error

MIB = 1024 * 1024


@dataclass
class ServiceSettings:
    # batching and load
    max_batch_size: int = 64
    max_wait_ms: float = 5.0
    max_concurrency: int = 256  # requests in the app at once; more get 429
    max_queue_samples: int | None = None  # default max(16 * max_batch_size, max_samples_per_request); more get 503
    max_samples_per_request: int = 4096
    request_timeout_s: float = 300.0  # a request's scoring (queue + call) before 504
    reward_timeout_s: float | None = None  # one reward call before it counts as stuck (default request_timeout_s)
    # request bodies
    max_body_bytes: int = 8 * MIB  # one body; reading stops at the first byte over it (413, connection closed)
    max_buffered_body_bytes: int = 128 * MIB  # all bodies being read or in the app together; over it: 503
    # connections (enforced in the HTTP protocol, before the app sees a request)
    max_connections: int = 1024  # open at once; at the cap the longest-idle connection is closed for a new one
    header_timeout_s: float = 10.0  # a request's headers, from the connection opening (or its first byte)
    body_timeout_s: float = 60.0  # a request's whole body, from the end of its headers
    keep_alive_s: float = 5.0  # an idle keep-alive connection between requests
    backlog: int = 256  # connections the kernel queues and asyncio accepts in one burst
    # memory and logs
    idempotency_cache_size: int = 1024  # finished responses kept for retries ...
    idempotency_cache_bytes: int = 64 * MIB  # ... and their total JSON bytes
    log_lines_per_interval: int = 20  # log lines of one kind (logger + message template) per interval ...
    log_interval_s: float = 10.0  # ... the rest are counted and summarised in the next line of that kind
    token: str | None = None
    # /get_reward (OpenRLHF): an errored sample fails the batch with 500 ("fail") or is filled ("value:X")
    on_error: str = "fail"
    # /get_reward: the reward's per-sample trace text (Themis) in extra_logs.trace, at most this many chars each;
    # 0 = off, because OpenRLHF turns every extra_logs list into a tensor and a list of text would break it
    trace_chars: int = 0

    def __post_init__(self) -> None:
        for key in ("max_batch_size", "max_body_bytes", "max_concurrency", "max_samples_per_request",
                    "max_buffered_body_bytes", "max_connections", "backlog", "log_lines_per_interval"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"service: {key} must be >= 1, got {getattr(self, key)}")
        for key in ("idempotency_cache_size", "idempotency_cache_bytes", "trace_chars"):
            if int(getattr(self, key)) < 0:
                raise ValueError(f"service: {key} must be >= 0 (0 turns the cache off), got {getattr(self, key)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"service: max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.reward_timeout_s is None:
            self.reward_timeout_s = self.request_timeout_s
        for key in ("request_timeout_s", "reward_timeout_s", "header_timeout_s", "body_timeout_s", "keep_alive_s",
                    "log_interval_s"):
            if not getattr(self, key) > 0:
                raise ValueError(f"service: {key} must be > 0, got {getattr(self, key)}")
        if self.max_buffered_body_bytes < self.max_body_bytes:
            raise ValueError(f"service: max_buffered_body_bytes ({self.max_buffered_body_bytes}) is below "
                             f"max_body_bytes ({self.max_body_bytes}); no body of the largest size could be read")
        if self.max_queue_samples is None:
            self.max_queue_samples = max(16 * self.max_batch_size, self.max_samples_per_request)
        parse_on_error(self.on_error)  # refuses anything but fail / value:X at start-up
        if self.token is not None and not self.token.strip():
            raise ValueError("service: token is empty; pass a non-empty --token or none on loopback")

    @property
    def fds_needed(self) -> int:
        """File descriptors the connection limits can take: the cap, one accept burst, and 64 for the rest."""
        return self.max_connections + self.backlog + 64


SETTING_NAMES = tuple(f.name for f in fields(ServiceSettings))
