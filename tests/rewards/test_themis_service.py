"""A Themis checkpoint served by `align serve-rewards` (issue 20, item 2): a tiny model that memorised
Calendar traces (the `calendar_themis` fixture, tests/conftest.py) writes its calls, the real Calendar tool answers, the value
head scores; the response carries each sample's trace and tool calls. A hanging tool ends as a failed call
within tool_timeout_s and the request still completes."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta
from pathlib import Path

import pytest
import requests

from align.tools import ToolResult, get_tool


def true_date(day: str, n: int) -> str:
    """The reference, written out with datetime (not the Calendar tool's code)."""
    return (date.fromisoformat(day) + timedelta(days=n)).isoformat()


@pytest.fixture(scope="module")
def checkpoint(calendar_themis):
    return calendar_themis["path"]


@pytest.fixture(scope="module")
def cases(calendar_themis):
    return calendar_themis["cases"][:2]


def calendar_batch(cases):
    prompts, completions, truth = [], [], []
    for day, n in cases:
        for answer in (true_date(day, n), true_date(day, n + 1)):  # positive, then negative
            prompts.append(f"What date is {n} days after {day}?")
            completions.append(answer)
            truth.append(true_date(day, n))
    return prompts, completions, truth


def observed(call: dict) -> str:
    """A tool call's observation: the info contract's "observation" (main's trace loop still calls it "output")."""
    return call["observation"] if "observation" in call else call["output"]


def check_calendar_sample(info: dict, truth: str, day: str, n: int, positive: bool) -> None:
    assert f"<start_observation> Observation: {truth}\n" in info["trace"]
    # the rationales memorised for the true date and for the wrong one (calendar_themis_traces)
    assert info["rationale"] == ("The answer matches the tool." if positive else "The answer differs from the tool.")
    (call,) = info["tool_calls"]
    assert (call["action"], call["input"], call["ok"], observed(call)) == ("Calendar.target_day", f"{day}, {n}", True, truth)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve-rewards exited with {proc.returncode}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    raise AssertionError("serve-rewards did not come up")


def test_serve_rewards_scores_with_a_themis_checkpoint_and_returns_traces(checkpoint, cases, tmp_path):
    # the training config's reward section names the checkpoint, as a run with `reward.functions` would
    config = tmp_path / "serve.json"
    config.write_text(json.dumps({"reward": {"functions": [
        {"name": "themis", "kwargs": {"model_path": str(checkpoint), "device": "cpu", "tool_timeout_s": 5}}]}}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-c", "import sys; from align.cli import main; sys.exit(main())", "serve-rewards", str(config),
           "--port", str(port), "--max-batch-size", "4", "--max-wait-ms", "3000", "--trace-chars", "4000",
           "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ALIGN_REWARD_TOKEN": ""}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_healthy(url, proc)
        prompts, completions, truth = calendar_batch(cases)
        halves = [(prompts[:2], completions[:2]), (prompts[2:], completions[2:])]
        # two concurrent requests of 2 samples: the batcher waits (max_wait_ms) until max_batch_size 4 is full
        with ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(lambda pc: requests.post(url + "/score", json={"prompts": pc[0], "completions": pc[1]},
                                                             timeout=120), halves))
        for r in replies:
            assert r.status_code == 200, r.text
        scores = [s for r in replies for s in r.json()["scores"]]
        infos = [i["component_info"]["themis"] for r in replies for i in r.json()["info"]]
        metrics = requests.get(url + "/metrics", timeout=10).text
        assert re.search(r"^reward_batch_size_count 1\.0$", metrics, re.M), "the two requests were one batch"
        assert re.search(r"^reward_batch_size_sum 4\.0$", metrics, re.M)
        for k, (day, n) in enumerate(cases):
            assert scores[2 * k] > scores[2 * k + 1]  # the true date above the date one day later
            for j in (2 * k, 2 * k + 1):
                check_calendar_sample(infos[j], truth[j], day, n, positive=j == 2 * k)
        # OpenRLHF's /get_reward: query = prompt + response; the traces come back in extra_logs.trace
        body = requests.post(url + "/get_reward", json={"query": [p + c for p, c in zip(prompts, completions)],
                                                        "prompts": prompts}, timeout=120).json()
        assert body["rewards"] == pytest.approx(scores, abs=1e-4)
        assert body["extra_logs"]["trace"] == [i["trace"] for i in infos]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


class Hang:
    """A tool that does not answer until released."""

    def __init__(self):
        self.release, self.calls = threading.Event(), 0

    def __call__(self, tool_input, context=None):
        self.calls += 1
        self.release.wait(60)
        return ToolResult(True, "12:00", None, 0.0)


def test_a_hanging_tool_ends_as_a_failed_call_within_its_timeout(checkpoint, cases, calendar_themis):
    from align.rewards.registry import get_reward
    from align.rewards.service import ServerThread, create_app

    hang = Hang()
    reward = get_reward("themis", model_path=str(checkpoint), device="cpu", tool_timeout_s=0.5,
                        tools=lambda name: hang if name == "Clock.now" else get_tool(name))
    (day, n), truth = cases[0], true_date(*cases[0])
    hang_q, hang_a = calendar_themis["hang"]
    try:
        with ServerThread(create_app(reward, token=None, max_wait_ms=0)) as url:
            t0 = time.monotonic()
            r = requests.post(url + "/score", json={"prompts": [hang_q, f"What date is {n} days after {day}?"],
                                                    "completions": [hang_a, truth]}, timeout=60)
            elapsed = time.monotonic() - t0
    finally:
        hang.release.set()
    assert r.status_code == 200, r.text
    hung, cal = r.json()["info"]
    (call,) = hung["tool_calls"]
    assert hang.calls == 1 and call["action"] == "Clock.now" and call["ok"] is False
    assert "timed out after 0.5s" in f"{call.get('error')} {call.get('observation')}"  # the call says why it failed
    # the trace shows a failure observation for it, never an answer
    shown = re.search(r"<start_observation> Observation: (.*)\n", hung["trace"]).group(1)
    assert "timed out" in shown
    check_calendar_sample(cal, truth, day, n, positive=True)  # the other sample of the batch is unaffected
    assert elapsed < 30  # the request finished (the tool would have held it for 60 s)


def test_a_checkpoint_that_is_not_themis_is_refused_at_configuration(tmp_path):
    from align.errors import MissingFileError
    from align.rewards.registry import get_reward

    with pytest.raises(MissingFileError, match="not a Themis checkpoint"):
        get_reward("themis", model_path=str(tmp_path))
    assert Path(tmp_path).is_dir()
