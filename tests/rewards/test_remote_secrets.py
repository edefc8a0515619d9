"""Secrets never on disk and the client's token from the environment (issue 16, item 4)."""
from __future__ import annotations

import pytest

from align.errors import UserError
from align.rewards.base import RewardFunction, RewardOutput
from align.rewards.client import RemoteReward, RemoteRewardError
from align.rewards.service import ServerThread, create_app

TOKEN = "tok-7f3a9c0e51d2-never-on-disk"


class Length(RewardFunction):
    name = "length"

    def score(self, prompts, completions, **columns):
        return RewardOutput(scores=[float(len(c)) for c in completions])


@pytest.fixture(scope="module")
def url():
    with ServerThread(create_app(Length(), token=TOKEN, max_wait_ms=1)) as base:
        yield base


def test_the_client_reads_align_reward_token_when_none_is_given(url, monkeypatch):
    monkeypatch.setenv("ALIGN_REWARD_TOKEN", TOKEN)
    assert RemoteReward(url).score(["p"], ["abc"]).scores == [3.0]
    assert TOKEN not in repr(RemoteReward(url))


def test_a_401_is_one_line_naming_the_fix(url, monkeypatch):
    monkeypatch.delenv("ALIGN_REWARD_TOKEN", raising=False)
    for token, why in ((None, "no token was sent"), ("wrong", "the token is wrong")):
        with pytest.raises(RemoteRewardError) as info:
            RemoteReward(url, token=token, max_retries=2, backoff_s=5.0).score(["p"], ["abc"])
        message = str(info.value)
        assert isinstance(info.value, UserError)  # the CLI prints it as one line, exit 2, no traceback
        assert "\n" not in message and why in message and "$ALIGN_REWARD_TOKEN" in message
        assert "reward.remote_token" in message


def test_a_run_with_remote_token_writes_it_nowhere(tiny_model_path, arithmetic_data, tmp_path, url):
    import align

    run = tmp_path / "run"
    align.train({
        "algorithm": "grpo",
        "model": {"path": str(tiny_model_path)},
        "data": {"path": str(arithmetic_data["prompts"])},
        "reward": {"functions": [], "remote_url": url, "remote_token": TOKEN},
        "rollout": {"max_new_tokens": 2, "temperature": 1.0},
        "algo": {"group_size": 2},
        "train": {"steps": 1, "prompts_per_step": 1, "micro_batch_size": 2, "lr": 1e-3, "seed": 0},
        "logging": {"run_dir": str(run), "progress": False, "print_every": 0, "tensorboard": True},
        "checkpoint": {"save_final": True},
    })
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name == "align_config.json" and p.parent.name.startswith("step-") for p in files)
    leaked = [str(p.relative_to(run)) for p in files if TOKEN.encode() in p.read_bytes()]
    assert leaked == []
    import json

    saved = json.loads(next(p for p in files if p.name == "align_config.json" and p.parent.name.startswith("step-")).read_text())
    assert saved["reward"]["remote_token"] == "<redacted>" and saved["reward"]["remote_url"] == url


def test_redaction_covers_secret_like_keys_and_spares_counts():
    from align.redact import redact_secrets

    cfg = {"reward": {"remote_token": "a", "functions": [{"name": "x", "kwargs": {"api_key": "b", "API_KEY": "c"}}]},
           "hub": {"hf_token": "d", "password": "e", "client_secret": "f"},
           "rollout": {"max_new_tokens": 8, "tokenizer_path": "m", "stop": ["</s>"]}, "empty_token": ""}
    out = redact_secrets(cfg)
    assert out["reward"]["remote_token"] == "<redacted>"
    assert out["reward"]["functions"][0]["kwargs"] == {"api_key": "<redacted>", "API_KEY": "<redacted>"}
    assert out["hub"] == {"hf_token": "<redacted>", "password": "<redacted>", "client_secret": "<redacted>"}
    assert out["rollout"] == cfg["rollout"] and out["empty_token"] == ""
    assert cfg["reward"]["remote_token"] == "a"  # a copy: the running config keeps its token
