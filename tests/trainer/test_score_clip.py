"""One score clip: `reward.clip`. The keys that used to clip the same score name it in a one-line error."""
from __future__ import annotations

import pytest

from align.config import config_from_dict
from align.errors import ConfigError
from align.reward_setup import build_reward


def base(algorithm="ppo", **sections):
    data = {"algorithm": algorithm, "model": {"path": "m"}, "data": {"path": "d"}, "reward": {"functions": ["format"]}}
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v}
    return data


@pytest.mark.parametrize("sections, key", [
    ({"algo": {"score_clip": 2.5}}, "algo.score_clip"),
    ({"reward": {"curiosity": {"eta": 0.1, "score_clip": 2.5}}}, "reward.curiosity.score_clip"),
])
def test_removed_clip_keys_name_the_replacement(sections, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict(base(**sections))
    message = str(err.value)
    assert "\n" not in message and key in message and "reward.clip" in message and "removed" in message


def test_grpo_has_no_score_clip_either():
    with pytest.raises(ConfigError, match="unknown config key 'algo.score_clip'"):
        config_from_dict(base("grpo", algo={"score_clip": 1.0}))


def test_reward_clip_is_the_one_clip():
    cfg = config_from_dict(base(reward={"clip": 2.5, "curiosity": {"eta": 0.1}}))
    assert cfg.reward.clip == 2.5
    assert not hasattr(cfg.reward.curiosity, "score_clip") and not hasattr(cfg.algo, "score_clip")
    assert build_reward(cfg.reward).clip == (-2.5, 2.5)
    assert build_reward(config_from_dict(base()).reward).clip is None
