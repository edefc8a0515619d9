"""OpenRLHF's client against a real `align serve-rewards` process (issue 16, item 3).

`openrlhf_remote_rm` does what OpenRLHF's remote_rm_fn / request_api_wrapper do: POST {"query", "prompts",
"labels"} to /get_reward with no auth header, `raise_for_status`, read `rewards`, retry any failure a few times
with a pause, then raise; the rewards are parsed with `torch.tensor` (a null there is OpenRLHF's crash).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BOS = "<|begin_of_text|>"


def openrlhf_remote_rm(url: str, queries, prompts, labels, try_max_times: int = 3, pause_s: float = 0.05):
    attempts = 0
    for _ in range(try_max_times):
        attempts += 1
        try:
            response = requests.post(url + "/get_reward", json={"query": queries, "prompts": prompts, "labels": labels},
                                     headers={"Content-Type": "application/json"}, timeout=30)
            response.raise_for_status()
            body = response.json()
            assert "rewards" in body
            rewards = torch.tensor(body["rewards"])  # OpenRLHF's float parsing
            extra = {k: torch.tensor(v) for k, v in body.get("extra_logs", {}).items()}
            return rewards, extra, attempts
        except (requests.RequestException, AssertionError):
            time.sleep(pause_s)
    raise RuntimeError(f"Request error for {attempts} times")


def _start(*flags: str, log: Path) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "ALIGN_REWARD_TOKEN"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "align.cli", "serve-rewards", "--reward", "_openrlhf_reward:LenPlusLabel",
           "--port", str(port), "--log-level", "warning", *flags]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve-rewards exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if requests.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except requests.RequestException:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("serve-rewards did not start within 60 s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def default_service(tmp_path_factory):
    proc, url = _start("--host", "127.0.0.1", log=tmp_path_factory.mktemp("svc") / "default.log")
    yield url
    _stop(proc)


@pytest.fixture(scope="module")
def filling_service(tmp_path_factory):
    """Off loopback, no token, asked for by name; errored samples filled with -1."""
    log = tmp_path_factory.mktemp("svc") / "noauth.log"
    proc, url = _start("--host", "0.0.0.0", "--no-auth", "--on-error", "value:-1", log=log)
    yield url, log
    _stop(proc)


PROMPT = "Question: what is two plus three, in words? Answer:"


def test_openrlhf_client_gets_numbers_for_bos_and_truncated_prompts(default_service):
    queries = [PROMPT + " five",  # query = prompt + response
               BOS + PROMPT + " five!",  # the client's decode kept the BOS
               "<s> " + PROMPT[:30] + " six",  # OpenRLHF truncated the prompt (and a BOS with a space)
               PROMPT]  # an empty response
    rewards, extra, attempts = openrlhf_remote_rm(default_service, queries, [PROMPT] * 4, [1, 2, 3, 4])
    # len(response) + label, responses written out: " five", " five!", " six", ""
    assert rewards.tolist() == [5 + 1, 6 + 2, 4 + 3, 0 + 4] and rewards.dtype == torch.float32
    assert extra["reward_error"].tolist() == [0, 0, 0, 0] and attempts == 1


def test_an_errored_sample_fails_the_batch_so_openrlhf_retries_then_raises(default_service):
    queries = [PROMPT + " five", PROMPT + " ERR", PROMPT + " four"]
    with pytest.raises(RuntimeError, match="Request error for 3 times"):
        openrlhf_remote_rm(default_service, queries, [PROMPT] * 3, [0, 0, 0])
    r = requests.post(default_service + "/get_reward", json={"query": queries, "prompts": [PROMPT] * 3}, timeout=30)
    assert r.status_code == 500
    detail = r.json()["detail"]
    assert "sample 1" in detail and "asked for an error" in detail and "--on-error value:X" in detail
    # a query that holds no prompt at all is an errored sample too, not a 422 for the whole batch
    r = requests.post(default_service + "/get_reward", json={"query": ["zzz"], "prompts": [PROMPT]}, timeout=30)
    assert r.status_code == 500 and "does not contain prompts[0]" in r.json()["detail"]


def test_on_error_value_fills_and_counts_and_no_auth_warns(filling_service):
    url, log = filling_service
    queries = [PROMPT + " five", PROMPT + " ERR", "unrelated text", BOS + PROMPT + " ok"]
    rewards, extra, attempts = openrlhf_remote_rm(url, queries, [PROMPT] * 4, [1, 1, 1, 1])
    assert rewards.tolist() == [5 + 1, -1.0, -1.0, 3 + 1] and attempts == 1
    assert extra["reward_error"].tolist() == [0, 1, 1, 0]
    body = requests.post(url + "/get_reward", json={"query": queries, "prompts": [PROMPT] * 4}, timeout=30).json()
    assert body["errors_filled"] == 2 and body["errors"][0] is None and "asked for an error" in body["errors"][1]
    text = log.read_text()
    assert "WITHOUT authentication (--no-auth)" in text and "0.0.0.0" in text


@pytest.mark.parametrize("head, cut", [("", None), (BOS, None), ("<s>", None), ("<s> ", 20), ("", 16), (BOS, 40)])
def test_the_prefix_rule_finds_the_response_after_a_bos_and_a_truncated_prompt(head, cut):
    from align.rewards.service.openrlhf import split_query

    response = " the answer is five"
    query = head + (PROMPT if cut is None else PROMPT[:cut]) + response
    assert split_query(query, PROMPT) == response
    assert split_query("no prompt here", PROMPT) is None
    assert split_query(PROMPT[:10] + response, PROMPT) is None  # too short a shared start to trust
    assert split_query("x" * 65 + PROMPT + response, PROMPT) is None  # a prompt that late is not behind a BOS
    assert split_query("abc", "") == "abc"


def test_cli_no_auth_is_asked_for_by_name(capsys, monkeypatch):
    import align.rewards.service as service
    from align.cli import main

    calls = []
    monkeypatch.setattr(service, "serve", lambda reward, **kw: calls.append(kw))
    monkeypatch.setenv("ALIGN_REWARD_TOKEN", "from-env")
    assert main(["serve-rewards", "--reward", "format", "--host", "0.0.0.0", "--no-auth"]) == 0
    assert calls[-1]["token"] is None and calls[-1]["no_auth"] is True  # the env token does not switch auth back on
    assert main(["serve-rewards", "--reward", "format", "--host", "0.0.0.0", "--no-auth", "--token", "t"]) == 2
    assert "--no-auth and a token" in capsys.readouterr().err
    monkeypatch.delenv("ALIGN_REWARD_TOKEN")
    assert main(["serve-rewards", "--reward", "format", "--host", "0.0.0.0"]) == 2  # the default stays: refused
    assert "--no-auth" in capsys.readouterr().err
    assert main(["serve-rewards", "--reward", "format", "--on-error", "value:nan"]) == 2
    assert "on_error" in capsys.readouterr().err
