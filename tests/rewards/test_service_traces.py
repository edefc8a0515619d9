"""Issue 16, item 7: the reward's trace (Themis writes info["trace"]) in /get_reward's extra_logs, asked for with
`--trace-chars N` (serve.trace_chars) and cut to N chars. Off by default: OpenRLHF turns every extra_logs list
into a tensor, so a list of text there would break its client."""
from __future__ import annotations

import pytest
import requests

from align.command_configs import ServeSettings
from align.config import build
from align.errors import ConfigError
from align.rewards.base import RewardFunction, RewardOutput
from align.rewards.mixture import RewardMixture
from align.rewards.service import ServerThread, create_app


class Traced(RewardFunction):
    name = "themis_like"

    def score(self, prompts, completions, **columns):
        return RewardOutput(scores=[float(len(c)) for c in completions],
                            info=[{"trace": f"Thought: check {c!r}" + "." * 50} for c in completions])


def _get_reward(url, queries, prompts):
    r = requests.post(url + "/get_reward", json={"query": queries, "prompts": prompts}, timeout=30)
    r.raise_for_status()
    return r.json()


def test_traces_in_extra_logs_bounded_per_sample():
    reward = RewardMixture([(Traced(), 1.0)])  # the trace sits in the mixture's component_info
    with ServerThread(create_app(reward, token=None, trace_chars=20, max_wait_ms=0)) as url:
        body = _get_reward(url, ["p: ab", "p: xyz"], ["p: ", "p: "])
    assert body["rewards"] == [2.0, 3.0]
    full = [f"Thought: check {c!r}" + "." * 50 for c in ("ab", "xyz")]
    assert body["extra_logs"]["trace"] == [t[:20] + f"... [{len(t) - 20} more chars]" for t in full]
    assert body["extra_logs"]["reward_error"] == [0.0, 0.0]


def test_no_traces_by_default_so_openrlhf_gets_numbers_only():
    with ServerThread(create_app(RewardMixture([(Traced(), 1.0)]), token=None, max_wait_ms=0)) as url:
        body = _get_reward(url, ["p: ab"], ["p: "])
    assert body["extra_logs"] == {"reward_error": [0.0]}


def test_trace_chars_must_not_be_negative():
    with pytest.raises(ConfigError, match="trace_chars = -1: must be >= 0"):
        build(ServeSettings, {"trace_chars": -1}, "serve")
