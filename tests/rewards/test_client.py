"""RemoteReward: scores through the service; bounded retries with one request id; explicit failures."""
from __future__ import annotations

import json
import pickle
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from align.rewards.base import RewardFunction, RewardOutput
from align.rewards.client import RemoteReward, RemoteRewardError
from align.rewards.mixture import RewardMixture
from align.rewards.service import ServerThread, create_app

TOKEN = "client-token"


class Length(RewardFunction):
    name = "length"

    def __init__(self):
        self.samples = 0

    def score(self, prompts, completions, **columns):
        self.samples += len(completions)
        labels = columns.get("label") or [0] * len(completions)
        return RewardOutput(scores=[float("nan") if c == "nan" else len(p) + 10 * len(c) + y
                                    for p, c, y in zip(prompts, completions, labels)],
                            info=[{"n": len(c), "columns": sorted(columns)} for c in completions],
                            token_rewards=[[float("inf")] if c == "inf" else [0.5] * len(c) for c in completions])


@pytest.fixture(scope="module")
def service():
    reward = Length()
    with ServerThread(create_app(reward, token=TOKEN, max_batch_size=8, max_wait_ms=1)) as url:
        yield url, reward


def test_remote_reward_scores_like_the_local_one(service):
    url, _ = service
    remote = RemoteReward(url, token=TOKEN, batch_size=3)  # 7 samples -> 3 requests, merged back in order
    prompts = ["p" * i for i in range(7)]
    completions = ["c" * (7 - i) for i in range(7)]
    labels = list(range(7))
    out = remote.score(prompts, completions, label=labels)
    assert out.scores == [float(i + 10 * (7 - i) + i) for i in range(7)]
    assert out.info == [{"n": 7 - i, "columns": ["label"]} for i in range(7)]
    assert out.token_rewards == [[0.5] * (7 - i) for i in range(7)]
    assert remote(["a"], ["bc"]) == [21.0]  # TRL-style call


def test_nan_comes_back_as_a_sample_error(service):
    url, _ = service
    out = RemoteReward(url, token=TOKEN).score(["", "", ""], ["nan", "x", "inf"])
    assert out.scores == [None, 10.0, None] and "non-finite" in out.errors[0]
    assert "token reward" in out.errors[2] and out.token_rewards[2] == []


def test_trainer_token_ids_are_not_sent(service):
    url, _ = service
    out = RemoteReward(url, token=TOKEN).score(["a"], ["b"], completion_ids=[[1, 2]], answer=["3"])
    assert out.info[0]["columns"] == ["answer"]


def test_rejections_raise_at_once_without_retries(service):
    url, reward = service
    before = reward.samples
    started = time.monotonic()
    with pytest.raises(RemoteRewardError, match="401"):
        RemoteReward(url, token="wrong", max_retries=3, backoff_s=1.0).score(["a"], ["b"])
    with pytest.raises(RemoteRewardError, match="422"):  # the server refuses private column names
        RemoteReward(url, token=TOKEN, max_retries=3, backoff_s=1.0).score(["a"], ["b"], _secret=[1])
    with pytest.raises(ValueError, match="label"):
        RemoteReward(url, token=TOKEN).score(["a"], ["b"], label=[1, 2])
    assert time.monotonic() - started < 1.0 and reward.samples == before


def test_plugs_into_a_mixture_and_pickles(service):
    url, _ = service
    remote = RemoteReward(url, token=TOKEN)
    remote.score([""], ["x"])  # opens a session
    clone = pickle.loads(pickle.dumps(remote))
    assert clone._session is None and "client-token" not in repr(clone)
    out = RewardMixture([(clone, 0.5)]).score([""], ["xy"])
    assert out.scores == [10.0]


class _Flaky(BaseHTTPRequestHandler):
    """Answers 503, 503, then 200; records the request ids it saw."""

    script: list[int] = []
    seen: list[str] = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body["request_id"])
        status = type(self).script.pop(0) if type(self).script else 200
        if status == 200:
            n = len(body["completions"])
            payload = {"scores": [1.0] * n, "errors": [None] * n, "info": [{}] * n, "request_id": body["request_id"]}
        else:
            payload = {"detail": "busy"}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def flaky():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Flaky.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_retries_on_5xx_reuse_the_request_id(flaky):
    _Flaky.script = [503, 500]
    out = RemoteReward(flaky, max_retries=3, backoff_s=0.01).score(["", ""], ["a", "b"])
    assert out.scores == [1.0, 1.0]
    assert len(_Flaky.seen) == 3 and len(set(_Flaky.seen)) == 1


def test_gives_up_after_the_last_retry_and_raises(flaky):
    _Flaky.script = [503] * 10
    started = time.monotonic()
    with pytest.raises(RemoteRewardError, match="after 3 attempts"):
        RemoteReward(flaky, max_retries=2, backoff_s=0.05).score([""], ["a"])
    elapsed = time.monotonic() - started
    assert len(_Flaky.seen) == 3
    assert 0.05 + 0.1 <= elapsed < 5  # backoff 0.05 then 0.1, bounded


def test_connection_refused_is_retried_then_raised():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    with pytest.raises(RemoteRewardError, match="ConnectionError"):
        RemoteReward(f"http://127.0.0.1:{port}", max_retries=1, backoff_s=0.01, timeout_s=2).score([""], ["a"])


def test_rejects_bad_configuration():
    with pytest.raises(ValueError, match="http"):
        RemoteReward("127.0.0.1:8000")
    with pytest.raises(ValueError):
        RemoteReward("http://x", max_retries=-1)


# ------------------------------------------------------------------------------------------------ end to end


class DigitShare(RewardFunction):
    """Fraction of completion characters that are digits; records every score it hands out."""

    name = "digit_share"

    def __init__(self):
        self.scored: list[float] = []
        self.seen_answers = 0

    def score(self, prompts, completions, **columns):
        self.seen_answers += sum(a is not None for a in columns.get("answer", []))
        scores = [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
        self.scored.extend(scores)
        return RewardOutput(scores=scores)


def test_grpo_on_cpu_scores_through_the_remote_service(tiny_model_path, arithmetic_data, tmp_path):
    import align

    served = DigitShare()
    with ServerThread(create_app(served, token=TOKEN, max_batch_size=16, max_wait_ms=2)) as url:
        result = align.train({
            "algorithm": "grpo",
            "model": {"path": str(tiny_model_path)},
            "data": {"path": str(arithmetic_data["prompts"])},
            "reward": {"functions": [], "remote_url": url, "remote_token": TOKEN},
            "rollout": {"max_new_tokens": 4, "temperature": 1.0},
            "algo": {"group_size": 4},
            "train": {"steps": 2, "prompts_per_step": 2, "micro_batch_size": 8, "lr": 1e-3, "seed": 0},
            "logging": {"run_dir": str(tmp_path / "run"), "progress": False, "print_every": 0},
            "checkpoint": {"save_final": False},
        })
    assert len(served.scored) == 2 * 2 * 4  # every sample of both steps was scored by the service
    assert served.seen_answers == len(served.scored)  # dataset columns travelled as metadata
    for step, record in enumerate(result.history):
        step_scores = served.scored[step * 8:(step + 1) * 8]
        assert record["reward/mean"] == pytest.approx(sum(step_scores) / 8, abs=1e-6)
        assert record["reward/errors"] == 0.0
