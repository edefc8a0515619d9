"""The scoring service's resource limits (issue 13, finding 3): floods against the service in its own process
(its RSS, file descriptors and log measured from /proc), a stuck reward, body size while reading, the byte-
bounded cache and the log rate limit. docs/security.md ("Scoring service limits") quotes the figures."""
from __future__ import annotations

import json
import logging
import resource
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from _service_proc import ServiceProcess

from align.rewards.base import RewardFunction, RewardOutput
from align.rewards.service import ServerThread, create_app

MIB = 1024 * 1024
# the flood server: 2 MiB bodies, 16 MiB of bodies at once, 8 MiB of cached responses, 256 connections, 2 s
# read deadlines, and 768 file descriptors (fewer than the 1,000 idle sockets, as on a default-ulimit host)
FLOOD = {"max_body_bytes": 2 * MIB, "max_buffered_body_bytes": 16 * MIB, "idempotency_cache_bytes": 8 * MIB,
         "max_connections": 256, "backlog": 256, "header_timeout_s": 2.0, "body_timeout_s": 2.0}
NOFILE = 768
# RSS growth over the idle baseline the floods may cause: measured 36 MB (slow bodies) and 17 MB (cache) with the
# limits above, 164 MB and 147 MB without them (2-core CPU, shared). docs/security.md derives the bound.
RSS_GROWTH_MB = 80


def score_once(url: str) -> int:
    return requests.post(url + "/score", json={"prompts": ["p"], "completions": ["abc"]}, timeout=10).status_code


@pytest.fixture
def flood_server(tmp_path):
    """A fresh service process per flood (~0.4 s to start), so VmHWM is that flood's own peak."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:  # this process opens the 1,000 idle sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 1100, "the idle flood needs 1,100 file descriptors here"
    with ServiceProcess(FLOOD, nofile=NOFILE, log_path=tmp_path / "service.log") as svc:
        assert score_once(svc.url) == 200
        svc.baseline_mb = svc.rss_mb()
        yield svc


def _post_head(port: int, length: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length)
    return s


def test_slow_body_flood_is_bounded_and_timed_out(flood_server):
    """64 bodies just under max_body_bytes, each held open one byte short: the bytes held stay under
    max_buffered_body_bytes (the rest get 503 at once) and every held body is cut at body_timeout_s with 408."""
    svc, started = flood_server, time.monotonic()
    body = json.dumps({"prompts": ["a"], "completions": ["b" * (2 * MIB - 100)]}).encode()
    socks = []
    for _ in range(64):
        s = _post_head(svc.port, len(body))
        try:
            s.sendall(body[:-1])
        except OSError:  # refused (503) and closed while we were still sending
            pass
        socks.append(s)
    answers = []
    for s in socks:
        s.settimeout(max(0.1, 2.0 + 3.0 - (time.monotonic() - started)))
        try:
            answers.append(s.recv(64).split(b"\r\n")[0])
        except socket.timeout:
            answers.append(b"no answer: still open")
        except OSError:
            answers.append(b"reset")
        s.close()
    assert time.monotonic() - started < 20
    growth = svc.peak_rss_mb() - svc.baseline_mb
    print(f"slow bodies: baseline {svc.baseline_mb:.0f} MB, peak +{growth:.0f} MB, answers {sorted(set(answers))}")
    assert growth < RSS_GROWTH_MB, f"RSS grew {growth:.0f} MB through the slow-body flood"
    assert all(a.startswith((b"HTTP/1.1 408", b"HTTP/1.1 503", b"reset")) for a in answers), set(answers)
    assert sum(a.startswith(b"HTTP/1.1 408") for a in answers) >= 1  # held bodies were cut, not kept
    assert score_once(svc.url) == 200


def test_byte_heavy_cache_is_bounded_in_bytes(flood_server):
    """150 retryable requests with ~1 MB responses: the cache keeps at most idempotency_cache_bytes of them."""
    svc, started = flood_server, time.monotonic()
    payload = {"prompts": [""] * 64, "completions": ["c" * 15_000] * 64}
    with requests.Session() as http:
        for i in range(150):
            r = http.post(svc.url + "/score", json={**payload, "request_id": f"heavy-{i}"}, timeout=30)
            assert r.status_code == 200 and len(r.content) > 900_000
        assert time.monotonic() - started < 20
        growth = svc.peak_rss_mb() - svc.baseline_mb
        print(f"cache: baseline {svc.baseline_mb:.0f} MB, peak +{growth:.0f} MB, now +{svc.rss_mb() - svc.baseline_mb:.0f} MB")
        assert growth < RSS_GROWTH_MB, f"RSS grew {growth:.0f} MB through the cache flood"
        # the newest response is still cached (a retry is answered without scoring: same bytes back)
        again = http.post(svc.url + "/score", json={**payload, "request_id": "heavy-149"}, timeout=30)
        assert again.content == r.content
    assert score_once(svc.url) == 200


def test_idle_connection_flood_is_capped_and_keeps_serving(flood_server):
    """1,000 idle sockets against max_connections=256 with 768 file descriptors: the service's descriptors stay
    near the cap, a normal request is served during the flood and the log grows by a few KB, not tens of MB."""
    svc, started = flood_server, time.monotonic()
    log_before = svc.log_bytes()
    socks = [socket.create_connection(("127.0.0.1", svc.port), timeout=5) for _ in range(1000)]
    try:
        time.sleep(0.5)
        fds = svc.open_fds()
        try:
            during = requests.post(svc.url + "/score", json={"prompts": [""], "completions": ["x"]}, timeout=5).status_code
        except requests.RequestException as err:
            during = type(err).__name__
        time.sleep(2.5)  # past header_timeout_s: the idle ones the cap kept are closed too
        fds_later, log_growth = svc.open_fds(), svc.log_bytes() - log_before
        growth = svc.peak_rss_mb() - svc.baseline_mb
    finally:
        for s in socks:
            s.close()
    seen = f"fds {fds} then {fds_later}, request during the flood: {during}, log +{log_growth} B, RSS +{growth:.0f} MB"
    print(f"idle: baseline {svc.baseline_mb:.0f} MB, {seen}")
    assert fds <= 256 + 64 and fds_later <= 64, seen
    assert during == 200, seen  # served during the flood
    assert log_growth < 64 * 1024, seen
    assert growth < RSS_GROWTH_MB, seen
    assert time.monotonic() - started < 20
    assert score_once(svc.url) == 200


# ------------------------------------------------------------------------------------------ body size while reading


def test_an_oversized_body_is_refused_before_it_is_read():
    """413 as soon as the body passes max_body_bytes: for a declared length at once, for a chunked body at the
    first chunk over the limit; the connection closes, so the rest is never read."""
    with ServerThread(create_app(Echo(), max_body_bytes=64 * 1024)) as url:
        port = int(url.rsplit(":", 1)[1])
        s = _post_head(port, 100 * MIB)  # declared: nothing of the body is sent
        s.settimeout(3)
        assert s.recv(64).startswith(b"HTTP/1.1 413")
        s.close()
        s = socket.create_connection(("127.0.0.1", port), timeout=3)
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 16 * 1024
        for _ in range(5):  # 80 KiB: over the 64 KiB limit, far under the 4x that used to be drained first
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        head = s.recv(4096)
        assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower()
        s.close()
        assert score_once(url) == 200


def test_json_that_parses_large_is_charged_before_it_is_parsed():
    """1.5 MiB of `[],` parses to ~37 MB of lists (25x); charged at 64 B per value it is over a 16 MiB budget
    and refused before parsing, while 1.5 MiB of text in a few strings is scored."""
    with ServerThread(create_app(Echo(), max_body_bytes=2 * MIB, max_buffered_body_bytes=16 * MIB)) as url:
        nested = requests.post(url + "/score", timeout=30, json={
            "prompts": [""], "completions": ["a"], "metadata": {"label": [[[] for _ in range(500_000)]]}})
        assert nested.status_code == 413 and "parsed" in nested.json()["detail"]
        text = requests.post(url + "/score", timeout=30, json={"prompts": ["", ""], "completions": ["x" * 750_000] * 2})
        assert text.status_code == 200 and text.json()["scores"] == [750_000.0, 750_000.0]


# ------------------------------------------------------------------------------------------ a stuck reward


class Hanging(RewardFunction):
    """Scores len(completion); "hang" blocks the call until `release` is set (close() sets it, as killing a
    reward's child process frees a call stuck on it)."""

    name = "hanging"

    def __init__(self):
        self.release = threading.Event()
        self.closed = False

    def score(self, prompts, completions, **columns):
        if "hang" in completions:
            self.release.wait(60)
        return RewardOutput(scores=[float(len(c)) for c in completions])

    def close(self):
        self.closed = True
        self.release.set()


class Echo(Hanging):
    name = "echo"


def test_a_stuck_reward_shows_in_health_and_requests_fail_fast():
    reward = Hanging()
    with ServerThread(create_app(reward, request_timeout_s=1.0, max_wait_ms=0)) as url, ThreadPoolExecutor(1) as pool:
        stuck = pool.submit(requests.post, url + "/score", json={"prompts": [""], "completions": ["hang"]}, timeout=30)
        time.sleep(1.3)  # past the 1 s timeout
        health = requests.get(url + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "stuck", health.text
        assert health.json()["reward_call_s"] is None or health.json()["reward_call_s"] > 1.0
        started = time.monotonic()
        r = requests.post(url + "/score", json={"prompts": [""], "completions": ["ok"]}, timeout=30)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "stuck" in r.json()["detail"]
        assert time.monotonic() - started < 0.5  # at once, not after the 1 s request timeout
        assert stuck.result().status_code == 504
        reward.release.set()  # the call returns: the service serves again
        deadline = time.monotonic() + 5
        while requests.get(url + "/health", timeout=5).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert requests.post(url + "/score", json={"prompts": [""], "completions": ["ok"]}, timeout=10).json()["scores"] == [2.0]


def test_a_stuck_reward_is_replaced_by_the_factory():
    first, built = Hanging(), []

    def factory():
        time.sleep(0.5)  # a slow rebuild: requests meanwhile get 503 "restarting"
        built.append(Hanging())
        return built[-1]

    app = create_app(first, reward_factory=factory, request_timeout_s=1.0, max_wait_ms=0)
    with ServerThread(app) as url:
        assert requests.post(url + "/score", json={"prompts": [""], "completions": ["hang"]}, timeout=30).status_code == 504
        health = requests.get(url + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "restarting"
        r = requests.post(url + "/score", json={"prompts": [""], "completions": ["ok"]}, timeout=30)
        assert r.status_code == 503 and "restarted" in r.json()["detail"]
        deadline = time.monotonic() + 5
        while requests.get(url + "/health", timeout=5).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert requests.post(url + "/score", json={"prompts": [""], "completions": ["abcd"]}, timeout=10).json()["scores"] == [4.0]
        assert first.closed and len(built) == 1 and app.state.batcher.reward is built[0]


# ------------------------------------------------------------------------------------------ cache and logs (units)


def test_idempotency_cache_is_an_lru_bounded_in_entries_and_bytes():
    import asyncio

    from align.rewards.service.cache import _Idempotency

    sizes = [300, 100, 700, 50, 2000, 400, 400, 10, 600, 250]
    cache = _Idempotency(max_entries=4, max_bytes=1000)

    async def fill():
        for i, n in enumerate(sizes):
            async def make(n=n):
                return b"x" * n
            await cache.run(("/score", str(i)), make)
            if i == 5:
                await cache.run(("/score", "3"), make)  # a hit: key 3 becomes the most recent

    asyncio.run(fill())
    # reference: a list of (key, size), newest last; append, drop the oldest while over 4 entries or 1,000 bytes,
    # never store one over 1,000 bytes; a hit moves the key to the end
    ref: list[tuple[str, int]] = []
    for i, n in enumerate(sizes):
        if n <= 1000:
            ref.append((str(i), n))
            while len(ref) > 4 or sum(m for _, m in ref) > 1000:
                ref.pop(0)
        if i == 5 and any(k == "3" for k, _ in ref):
            ref.append(ref.pop([k for k, _ in ref].index("3")))
    assert [k for _, k in cache.done] == [k for k, _ in ref]
    assert cache.bytes == sum(n for _, n in ref) == sum(len(v) for v in cache.done.values()) <= 1000


def test_log_rate_limit_lets_n_lines_per_kind_through_and_counts_the_rest():
    from align.rewards.service import RateLimitFilter

    now = [0.0]
    limiter = RateLimitFilter(per_interval=3, interval_s=10.0, clock=lambda: now[0])

    def record(msg, *args, name="uvicorn.error"):
        return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, None)

    passed = [limiter.filter(record("Invalid HTTP request from %s", i)) for i in range(100)]
    assert passed == [True] * 3 + [False] * 97
    assert limiter.filter(record("another kind")) and limiter.filter(record("Invalid HTTP request from %s", 1, name="asyncio"))
    now[0] = 10.5
    first = record("Invalid HTTP request from %s", 7)
    assert limiter.filter(first)
    assert first.getMessage() == "Invalid HTTP request from 7 [97 similar lines suppressed in the last 10s]"
    again = record("Invalid HTTP request from %s", 8)
    assert limiter.filter(again) and again.getMessage() == "Invalid HTTP request from 8"
    assert limiter.filter(again)  # the same record judged twice (logger, then handler) counts once


def test_limits_are_validated_config_fields_and_cli_flags(tmp_path, monkeypatch, capsys):
    import align.rewards.service as service
    from align.cli import main
    from align.rewards.service import ServiceSettings

    calls = []
    monkeypatch.setattr(service, "serve", lambda reward, **kw: calls.append((reward, kw)))
    monkeypatch.delenv("ALIGN_REWARD_TOKEN", raising=False)
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("reward: format\nserve:\n  max_connections: 300\n  idempotency_cache_bytes: 1000\n")
    assert main(["serve-rewards", str(cfg), "--header-timeout-s", "3", "--body-timeout-s", "9",
                 "--max-buffered-body-bytes", "33554432", "--reward-timeout-s", "20",
                 "--set", "serve.log_lines_per_interval=5"]) == 0
    kw = calls[-1][1]
    assert {k: kw[k] for k in ("max_connections", "idempotency_cache_bytes", "header_timeout_s", "body_timeout_s",
                               "max_buffered_body_bytes", "reward_timeout_s", "log_lines_per_interval")} == {
        "max_connections": 300, "idempotency_cache_bytes": 1000, "header_timeout_s": 3.0, "body_timeout_s": 9.0,
        "max_buffered_body_bytes": 32 * MIB, "reward_timeout_s": 20.0, "log_lines_per_interval": 5}
    calls[-1][0].close()
    assert main(["serve-rewards", "--reward", "format", "--set", "serve.max_connections=0"]) == 2
    assert "serve.max_connections = 0: must be > 0" in capsys.readouterr().err
    assert main(["serve-rewards", "--reward", "format", "--header-timeout-s", "-1"]) == 2
    assert "header_timeout_s" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_buffered_body_bytes"):
        ServiceSettings(max_body_bytes=8 * MIB, max_buffered_body_bytes=MIB)


def test_the_fd_limit_is_raised_to_what_the_cap_needs_or_refused():
    from align.rewards.service import ServiceSettings
    from align.rewards.service.server import ensure_fd_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
        ensure_fd_limit(ServiceSettings(max_connections=1000, backlog=100))
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 1000 + 100 + 64
        if hard != resource.RLIM_INFINITY:
            with pytest.raises(ValueError, match="ulimit -Hn"):
                ensure_fd_limit(ServiceSettings(max_connections=hard + 1))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

