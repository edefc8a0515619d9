"""RewardMixture against formulas written out here in float64 (numpy as the reference)."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from align.rewards.base import RewardFunction, RewardOutput
from align.rewards.mixture import RewardMixture, RunningMeanStd


class Table(RewardFunction):
    """Scores looked up by completion text; 'ERR' -> error, missing -> None (not applicable)."""

    def __init__(self, name, table, tokens=None):
        self.name, self.table, self.tokens = name, table, tokens

    def score(self, prompts, completions, **columns):
        scores, errors = [], []
        for c in completions:
            v = self.table.get(c)
            scores.append(None if v == "ERR" else v)
            errors.append("broken" if v == "ERR" else None)
        tokens = None if self.tokens is None else [list(self.tokens[c]) for c in completions]
        return RewardOutput(scores=scores, errors=errors, token_rewards=tokens)


def test_weighted_sum_and_clip():
    a = Table("a", {"x": 1.0, "y": 3.0, "z": -2.0})
    b = Table("b", {"x": 0.5, "y": 10.0, "z": -8.0})
    mix = RewardMixture([(a, 2.0), (b, 0.5)])
    out = mix.score(["", "", ""], ["x", "y", "z"])
    assert out.scores == [2 * 1.0 + 0.5 * 0.5, 2 * 3.0 + 0.5 * 10.0, 2 * -2.0 + 0.5 * -8.0]
    assert out.info[1]["components"] == {"a": 3.0, "b": 10.0}
    clipped = RewardMixture([(a, 2.0), (b, 0.5)], clip=5.0).score(["", "", ""], ["x", "y", "z"])
    assert clipped.scores == [2.25, 5.0, -5.0]
    asym = RewardMixture([(a, 1.0)], clip=(0.0, 2.0)).score(["", "", ""], ["x", "y", "z"])
    assert asym.scores == [1.0, 2.0, 0.0]


def test_running_normalisation_matches_numpy_over_the_stream():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=n) for n in (5, 8, 3)]
    seen = []
    mix = None
    for batch in batches:
        table = {f"s{i}": float(v) for i, v in enumerate(batch)}
        if mix is None:
            mix = RewardMixture([(Table("a", table), 1.5)], normalize="running", eps=1e-8)
        else:
            mix.rewards[0].table = table
        out = mix.score([""] * len(batch), list(table))
        seen.extend(batch.tolist())
        ref = np.asarray(seen, dtype=np.float64)
        expected = 1.5 * (batch - ref.mean()) / (ref.std() + 1e-8)  # population std of everything so far
        np.testing.assert_allclose(out.scores, expected, rtol=1e-12, atol=1e-12)


def test_running_mean_std_merge_is_exact():
    rs = RunningMeanStd()
    data = [1.0, 2.0, 4.0, 8.0, 16.0, -3.0]
    rs.update(data[:2])
    rs.update(data[2:5])
    rs.update(data[5:])
    assert rs.count == 6
    assert rs.mean == pytest.approx(sum(data) / 6, abs=1e-12)
    assert rs.var == pytest.approx(sum((x - sum(data) / 6) ** 2 for x in data) / 6, abs=1e-12)


def test_errors_nan_and_inapplicable_components():
    a = Table("a", {"x": 1.0, "y": "ERR", "w": None, "n": float("nan"), "v": None})
    b = Table("b", {"x": 2.0, "y": 4.0, "w": 5.0, "n": 1.0, "v": None})
    out = RewardMixture([(a, 1.0), (b, 1.0)]).score([""] * 5, ["x", "y", "w", "n", "v"])
    assert out.scores[0] == 3.0
    assert out.scores[1] is None and out.errors[1] == "a: broken"
    assert out.scores[2] == 5.0 and out.errors[2] is None  # a does not apply: contributes nothing
    assert out.scores[3] is None and "non-finite" in out.errors[3]  # NaN never reaches the sum
    assert out.scores[4] is None and out.errors[4] is None  # nothing applies
    skip = RewardMixture([(a, 1.0), (b, 1.0)], on_error="skip_component").score([""] * 2, ["y", "n"])
    assert skip.scores == [4.0, 1.0] and skip.errors == [None, None]
    assert skip.info[0]["component_errors"] == {"a": "broken"}
    # a zero-weight component's error does not matter
    zero = RewardMixture([(a, 0.0), (b, 1.0)]).score([""], ["y"])
    assert zero.scores == [4.0] and zero.errors == [None]


def test_running_stats_skip_errors_and_roundtrip_state():
    a = Table("a", {"x": 1.0, "y": 3.0, "e": "ERR"})
    mix = RewardMixture([(a, 1.0)], normalize="running")
    mix.score(["", "", ""], ["x", "y", "e"])
    assert mix.stats[0].count == 2 and mix.stats[0].mean == 2.0
    clone = RewardMixture([(Table("a", {"x": 1.0}), 1.0)], normalize="running")
    clone.load_state_dict(pickle.loads(pickle.dumps(mix.state_dict())))
    assert (clone.stats[0].count, clone.stats[0].mean, clone.stats[0].m2) == (2, 2.0, 2.0)
    restored = pickle.loads(pickle.dumps(mix))
    assert restored.stats[0].mean == 2.0


def test_token_rewards_are_weighted_sums_and_nan_tokens_are_errors():
    a = Table("a", {"x": 1.0, "y": 1.0}, tokens={"x": [0.5, 1.0], "y": [float("nan"), 0.0]})
    b = Table("b", {"x": 0.0, "y": 0.0}, tokens={"x": [2.0, -1.0], "y": [1.0, 1.0]})
    out = RewardMixture([(a, 2.0), (b, 0.5)]).score(["", ""], ["x", "y"])
    assert out.token_rewards[0] == [2 * 0.5 + 0.5 * 2.0, 2 * 1.0 + 0.5 * -1.0]
    assert out.scores[1] is None and "token" in out.errors[1]


def test_component_names_are_unique_and_config_is_checked():
    a = Table("r", {"x": 1.0})
    mix = RewardMixture([(a, 1.0), (Table("r", {"x": 2.0}), 1.0)])
    assert mix.names == ["r", "r_2"]
    for bad in (dict(normalize="zscore"), dict(on_error="ignore"), dict(clip=(1.0, 0.0))):
        with pytest.raises(ValueError):
            RewardMixture([(a, 1.0)], **bad)
    with pytest.raises(ValueError, match="finite"):
        RewardMixture([(a, math.inf)])
    with pytest.raises(ValueError):
        RewardMixture([])


def test_normalize_by_a_column_keeps_separate_statistics_per_value():
    table = {"a": 1.0, "b": 3.0, "c": 10.0, "d": 30.0, "e": 5.0}
    mix = RewardMixture([(Table("t", table), 1.0)], normalize="running", normalize_by="data_source")
    out = mix.score([""] * 4, ["a", "b", "c", "d"], data_source=["gsm8k", "gsm8k", "math", "math"])
    # each source on its own: mean 2 / std 1 and mean 20 / std 10 (population std)
    np.testing.assert_allclose(out.scores, [-1.0, 1.0, -1.0, 1.0], atol=1e-7)
    out = mix.score([""], ["e"], data_source=["gsm8k"])
    ref = np.array([1.0, 3.0, 5.0])
    np.testing.assert_allclose(out.scores, [(5.0 - ref.mean()) / (ref.std() + 1e-8)], rtol=1e-12)
    assert mix.group_stats[0]["math"].count == 2
    with pytest.raises(ValueError, match="data_source"):
        mix.score([""], ["a"])
    with pytest.raises(ValueError, match="normalize_by"):
        RewardMixture([(Table("t", table), 1.0)], normalize_by="data_source")
