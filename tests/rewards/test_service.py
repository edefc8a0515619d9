"""The scoring service over real HTTP (uvicorn in a thread, `requests` as the client)."""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from align.rewards.base import RewardFunction, RewardOutput
from align.rewards.service import ServerThread, check_bind, create_app, serve

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Probe(RewardFunction):
    """score = len(completion) + numeric label; "nan" -> NaN; "raise" -> the reward raises.
    Records batch sizes; `gate` blocks scoring while cleared."""

    name = "probe"

    def __init__(self):
        self.batches: list[int] = []
        self.samples = 0
        self.gate = threading.Event()
        self.gate.set()
        self.threads: set[str] = set()

    def score(self, prompts, completions, **columns):
        self.gate.wait(30)
        self.threads.add(threading.current_thread().name)
        self.batches.append(len(completions))
        self.samples += len(completions)
        if "raise" in completions:
            raise RuntimeError("reward crashed")
        labels = columns.get("label") or [0] * len(completions)
        scores = []
        for c, y in zip(completions, labels):
            bonus = y if isinstance(y, (int, float)) and not isinstance(y, bool) else 0
            scores.append(float("nan") if c == "nan" else len(c) + bonus)
        return RewardOutput(scores=scores, info=[{"chars": len(c)} for c in completions])


@pytest.fixture(scope="module")
def probe():
    return Probe()


@pytest.fixture(scope="module")
def url(probe):
    app = create_app(probe, token=TOKEN, max_batch_size=16, max_wait_ms=20, max_body_bytes=64 * 1024,
                     max_samples_per_request=100, max_concurrency=64)
    with ServerThread(app) as base:
        yield base


def post(url, path, payload, headers=AUTH, **kw):
    return requests.post(url + path, json=payload, headers=headers, timeout=30, **kw)


def test_score_roundtrip(url):
    r = post(url, "/score", {"prompts": ["p1", "p2"], "completions": ["abc", "de"],
                             "metadata": {"label": [10, 0.5]}, "request_id": "rt-1"})
    assert r.status_code == 200
    body = r.json()
    assert body["scores"] == [13.0, 2.5] and body["errors"] == [None, None]
    assert body["info"] == [{"chars": 3}, {"chars": 2}] and body["request_id"] == "rt-1"


def test_get_reward_openrlhf_shape(url):
    r = post(url, "/get_reward", {"query": ["Q: hi A: hello", "Q: x A: yy"], "prompts": ["Q: hi A:", "Q: x A:"],
                                  "labels": [1, 2]})
    assert r.status_code == 200
    body = r.json()
    # responses " hello" (6 chars) + 1 and " yy" (3 chars) + 2
    assert body["rewards"] == [7.0, 5.0] and body["scores"] == [7.0, 5.0]
    assert body["extra_logs"] == {"reward_error": [0.0, 0.0]} and body["errors_filled"] == 0
    r = post(url, "/get_reward", {"query": ["abcd"]})  # no prompts: the whole query is scored
    assert r.json()["rewards"] == [4.0]


def test_nan_score_is_a_sample_error_not_a_500(url):
    r = post(url, "/score", {"prompts": ["", ""], "completions": ["nan", "ok"]})
    assert r.status_code == 200
    body = r.json()
    assert body["scores"] == [None, 2.0] and "non-finite" in body["errors"][0] and body["errors"][1] is None
    # /get_reward holds numbers only: an errored sample fails the batch (OpenRLHF's torch.tensor(rewards))
    r = post(url, "/get_reward", {"query": ["nan", "ok"]})
    assert r.status_code == 500 and "sample 0" in r.json()["detail"] and "--on-error" in r.json()["detail"]


@pytest.mark.parametrize("case, status", [
    ("malformed_json", 400), ("wrong_lengths", 422), ("metadata_length", 422), ("bad_column", 422),
    ("unknown_field", 422), ("query_lengths", 422), ("oversized_body", 413), ("too_many_samples", 413),
    ("missing_token", 401), ("wrong_token", 401), ("wrong_scheme", 401),
])
def test_bad_requests_get_the_right_4xx_and_the_server_keeps_serving(url, case, status):
    good = {"prompts": ["a"], "completions": ["b"]}
    if case == "malformed_json":
        r = requests.post(url + "/score", data='{"prompts": [', headers={**AUTH, "Content-Type": "application/json"})
    elif case == "wrong_lengths":
        r = post(url, "/score", {"prompts": ["a", "b"], "completions": ["c"]})
    elif case == "metadata_length":
        r = post(url, "/score", {**good, "metadata": {"label": [1, 2]}})
    elif case == "bad_column":
        r = post(url, "/score", {**good, "metadata": {"prompts": ["x"]}})
    elif case == "unknown_field":
        r = post(url, "/score", {**good, "completion": ["typo"]})
    elif case == "query_lengths":
        r = post(url, "/get_reward", {"query": ["abc"], "prompts": ["a", "b"]})
    elif case == "oversized_body":
        r = post(url, "/score", {"prompts": ["a"], "completions": ["b" * 200_000]})
    elif case == "too_many_samples":
        r = post(url, "/score", {"prompts": [""] * 101, "completions": [""] * 101})
    elif case == "missing_token":
        r = post(url, "/score", good, headers={})
    elif case == "wrong_token":
        r = post(url, "/score", good, headers={"Authorization": "Bearer nope"})
    else:
        r = post(url, "/score", good, headers={"Authorization": f"Basic {TOKEN}"})
    assert r.status_code == status, r.text
    assert "detail" in r.json()
    if status == 401:
        assert r.headers["WWW-Authenticate"] == "Bearer"
    if status == 422:
        assert "b" * 50 not in r.text  # the payload is not echoed back
    assert requests.get(url + "/health", timeout=10).json()["status"] == "ok"
    assert post(url, "/score", good).json()["scores"] == [1.0]


def test_a_crashing_batch_fails_only_the_request_that_broke_it(url, probe):
    probe.gate.clear()
    with ThreadPoolExecutor(2) as pool:
        bad = pool.submit(post, url, "/score", {"prompts": [""], "completions": ["raise"]})
        good = pool.submit(post, url, "/score", {"prompts": [""], "completions": ["fine"]})
        time.sleep(0.3)
        probe.gate.set()
        assert bad.result().status_code == 500 and "reward crashed" in bad.result().json()["detail"]
        assert good.result().status_code == 200 and good.result().json()["scores"] == [4.0]


def test_dynamic_batching_merges_and_splits_back_in_order(url, probe):
    probe.gate.clear()
    before = len(probe.batches)
    completions = ["x" * (i + 1) for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(post, url, "/score", {"prompts": [""], "completions": [c], "metadata": {"label": [i]}})
                   for i, c in enumerate(completions)]
        time.sleep(1.0)  # every request is queued behind the blocked batch
        probe.gate.set()
        results = [f.result().json()["scores"][0] for f in futures]
    assert results == [len(c) + i for i, c in enumerate(completions)]
    sizes = probe.batches[before:]
    assert sum(sizes) == 12 and max(sizes) > 1 and max(sizes) <= 16
    assert all(name.startswith("reward-score") for name in probe.threads)  # never on the event loop thread


def test_the_event_loop_answers_while_a_batch_is_scoring(url, probe):
    probe.gate.clear()
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(post, url, "/score", {"prompts": [""], "completions": ["slow"]})
        time.sleep(0.2)
        started = time.monotonic()
        health = requests.get(url + "/health", timeout=5).json()
        assert time.monotonic() - started < 5.0 and health["in_flight"] >= 1
        probe.gate.set()
        assert slow.result().json()["scores"] == [4.0]


def test_request_id_makes_retries_idempotent(url, probe):
    payload = {"prompts": ["", ""], "completions": ["ab", "cd"], "request_id": "retry-42"}
    first = post(url, "/score", payload).json()
    samples = probe.samples
    second = post(url, "/score", payload).json()
    assert second == first and probe.samples == samples


def test_metrics_are_prometheus_text_behind_the_token(url):
    post(url, "/score", {"prompts": [""], "completions": ["m"]})
    assert requests.get(url + "/metrics", timeout=10).status_code == 401
    text = requests.get(url + "/metrics", headers=AUTH, timeout=10).text
    for name in ("reward_requests_total", "reward_samples_total", "reward_sample_errors_total",
                 "reward_request_latency_seconds_bucket", "reward_queue_samples", "reward_batch_size_bucket"):
        assert name in text
    assert 'reward_requests_total{path="/score",status="200"}' in text
    assert 'reward_requests_total{path="/score",status="401"}' in text


def test_payloads_never_reach_the_logs(url, caplog):
    secret = "PAYLOAD-" + "z" * 12
    with caplog.at_level(logging.DEBUG):
        post(url, "/score", {"prompts": [secret], "completions": [secret]})
        post(url, "/score", {"prompts": [secret], "completions": []})
    assert secret not in caplog.text


def test_openapi_schema_lists_the_endpoints(url):
    schema = requests.get(url + "/openapi.json", timeout=10).json()
    assert {"/score", "/get_reward", "/health", "/metrics"} <= set(schema["paths"])
    assert "413" in schema["paths"]["/score"]["post"]["responses"]


def wait_for_health(base, predicate, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate(requests.get(base + "/health", timeout=5).json()):
            return
        time.sleep(0.02)
    raise AssertionError("the service never reached the expected state")


def _blocked_app(probe, **kw):
    return ServerThread(create_app(probe, token=None, **kw))


def test_over_the_concurrency_limit_is_429_not_a_hang():
    probe = Probe()
    probe.gate.clear()
    with _blocked_app(probe, max_concurrency=2, max_batch_size=1, max_wait_ms=0) as base, ThreadPoolExecutor(2) as pool:
        held = [pool.submit(post, base, "/score", {"prompts": [""], "completions": ["a"]}, {}) for _ in range(2)]
        wait_for_health(base, lambda h: h["in_flight"] == 2)
        started = time.monotonic()
        r = post(base, "/score", {"prompts": [""], "completions": ["a"]}, {})
        assert r.status_code == 429 and r.headers["Retry-After"] == "1" and time.monotonic() - started < 5
        probe.gate.set()
        assert [f.result().status_code for f in held] == [200, 200]


def test_a_full_queue_is_503():
    probe = Probe()
    probe.gate.clear()
    with _blocked_app(probe, max_batch_size=1, max_wait_ms=0, max_queue_samples=2, max_concurrency=50) as base, \
            ThreadPoolExecutor(3) as pool:
        first = pool.submit(post, base, "/score", {"prompts": [""], "completions": ["a"]}, {})
        # the first request is being scored (blocked) and the queue is empty again
        wait_for_health(base, lambda h: h["in_flight"] == 1 and h["queue_samples"] == 0)
        queued = pool.submit(post, base, "/score", {"prompts": ["", ""], "completions": ["b", "c"]}, {})
        wait_for_health(base, lambda h: h["queue_samples"] == 2)
        r = post(base, "/score", {"prompts": [""], "completions": ["d"]}, {})
        assert r.status_code == 503 and "queue" in r.json()["detail"]
        probe.gate.set()
        assert first.result().status_code == 200 and queued.result().json()["scores"] == [1.0, 1.0]


def test_public_bind_needs_a_token():
    with pytest.raises(ValueError, match="--token"):
        check_bind("0.0.0.0", None)
    with pytest.raises(ValueError, match="--token"):
        serve(Probe(), host="10.1.2.3", port=1)
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("0.0.0.0", "t")


def test_cli_refuses_public_host_without_token_and_unknown_rewards(capsys, monkeypatch):
    from align.cli import main

    monkeypatch.delenv("ALIGN_REWARD_TOKEN", raising=False)
    assert main(["serve-rewards", "--reward", "format", "--host", "0.0.0.0"]) == 2
    assert "--token" in capsys.readouterr().err
    assert main(["serve-rewards", "--reward", "math_verfy"]) == 2
    assert "did you mean 'math_verify'" in capsys.readouterr().err
    assert main(["serve-rewards", "--reward", "format", "--reward-kwargs", "{bad"]) == 2
    assert "--reward-kwargs" in capsys.readouterr().err


def test_cli_builds_the_reward_and_settings_from_config_flags_and_env(tmp_path, monkeypatch):
    import align.rewards.service as service
    from align.cli import main
    from align.rewards.mixture import RewardMixture

    calls = []
    monkeypatch.setattr(service, "serve", lambda reward, **kw: calls.append((reward, kw)))
    monkeypatch.setenv("ALIGN_REWARD_TOKEN", "from-env")
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("reward:\n  functions:\n    - {name: format, weight: 2.0, kwargs: {pattern: '^a'}}\n"
                   "    - math_verify\n  normalize: none\nserve:\n  port: 9001\n  max_batch_size: 8\n")
    assert main(["serve-rewards", str(cfg), "--max-wait-ms", "7", "--host", "0.0.0.0"]) == 0
    reward, kw = calls[-1]
    assert isinstance(reward, RewardMixture) and reward.weights == [2.0, 1.0]
    fresh = kw.pop("reward_factory")()  # the replacement for a stuck reward: a new object built the same way
    assert isinstance(fresh, RewardMixture) and fresh is not reward and fresh.weights == [2.0, 1.0]
    fresh.close()
    assert kw == {"host": "0.0.0.0", "port": 9001, "token": "from-env", "no_auth": False, "log_level": "info", "max_batch_size": 8,
                  "max_wait_ms": 7.0}
    assert main(["serve-rewards", "--reward", "math_verify", "--reward-kwargs", '{"timeout_s": 3}']) == 0
    assert calls[-1][0].timeout_s == 3 and calls[-1][1]["port"] == 8000 and calls[-1][1]["host"] == "127.0.0.1"
    reward.close()
    calls[-1][0].close()


def test_cli_set_overrides_and_typo_suggestions(tmp_path, monkeypatch, capsys):
    import align.rewards.service as service
    from align.cli import main

    calls = []
    monkeypatch.setattr(service, "serve", lambda reward, **kw: calls.append((reward, kw)))
    monkeypatch.delenv("ALIGN_REWARD_TOKEN", raising=False)
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("reward: format\nserve:\n  port: 9001\nmodel: {path: ignored}\n")  # other sections are ignored
    assert main(["serve-rewards", str(cfg), "--set", "serve.port=9100", "--set", "serve.max_wait_ms=3"]) == 0
    assert callable(calls[-1][1].pop("reward_factory"))
    assert calls[-1][1] == {"host": "127.0.0.1", "port": 9100, "token": None, "no_auth": False, "log_level": "info",
                            "max_wait_ms": 3.0}
    calls[-1][0].close()
    assert main(["serve-rewards", "--reward", "format", "--set", "serve.prot=1"]) == 2
    assert "did you mean 'serve.port'" in capsys.readouterr().err
    assert main(["serve-rewards", "--reward", "format", "--set", "serve.port=eighty"]) == 2
    assert "serve.port = 'eighty' must be an integer" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ schemathesis

schemathesis = pytest.importorskip("schemathesis")


@pytest.fixture(scope="module")
def math_service():
    from align.rewards.registry import get_reward

    reward = get_reward("math_verify", timeout_s=0.5)
    app = create_app(reward, token=TOKEN, max_batch_size=16, max_wait_ms=2, max_body_bytes=256 * 1024)
    with ServerThread(app) as base:
        yield base
    reward.close()


@pytest.mark.filterwarnings("ignore")
def test_schemathesis_finds_no_server_errors(math_service):
    """Positive and negative cases for every operation in /openapi.json: never a 5xx."""
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation.modes import GenerationMode

    api = schemathesis.openapi.from_url(math_service + "/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/score", "/get_reward", "/health", "/metrics"}
    calls = []
    for op in operations:
        # GET endpoints take no input, so only POST bodies can be made invalid
        modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if op.method.upper() == "POST" else (GenerationMode.POSITIVE,)
        for mode in modes:
            @settings(max_examples=8, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                response = case.call_and_validate(base_url=math_service, headers=AUTH, checks=[not_a_server_error],
                                                  timeout=30)
                calls.append(response.status_code)

            run()
    assert calls and max(calls) < 500
    assert requests.get(math_service + "/health", timeout=10).json()["status"] == "ok"


def test_a_reward_rejecting_the_data_is_422_not_500(math_service):
    r = post(math_service, "/score", {"prompts": [""], "completions": [r"\boxed{1}"]})  # no label column
    assert r.status_code == 422 and "label" in r.json()["detail"]
    r = post(math_service, "/score", {"prompts": [""], "completions": [r"\boxed{1}"], "metadata": {"label": ["1"]}})
    assert r.status_code == 200 and r.json()["scores"] == [1.0]


@pytest.mark.slow
def test_load_64_clients_through_the_cli_service():
    """64 concurrent clients for 5 s against `align serve-rewards` in a subprocess: every request answered 200."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "reward_service.py"
    spec = importlib.util.spec_from_file_location("reward_service_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = {"name": "math_verify, batched", "reward": "math_verify", "max_batch_size": 64, "max_wait_ms": 5}
    port = bench.free_port()
    proc = bench.start_service(cfg, port)
    try:
        bench.drive(f"http://127.0.0.1:{port}", bench.MATH_ITEMS, 4, 1.0, 4)  # warm-up: starts the sympy child
        stats = bench.drive(f"http://127.0.0.1:{port}", bench.MATH_ITEMS, 64, 5.0, 4)
    finally:
        proc.terminate()
        proc.wait(10)
    assert stats["requests"] > 64 and stats["ok"] == stats["requests"], stats["statuses"]
    assert stats["sample_errors"] == 0 and stats["p99_ms"] < 30_000
