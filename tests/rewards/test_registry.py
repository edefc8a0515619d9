"""The reward registry: built-in names, kwargs, lazy entries, plug-ins, errors that name the fix."""
from __future__ import annotations

import pickle
from importlib import metadata

import pytest

from align import rewards
from align.rewards.base import CallableReward, RewardFunction, RewardOutput
from align.rewards.registry import REWARDS, LazyReward, get_reward, register_reward, reward_factory
from align.rewards.verifiers import CodeTests, FormatReward, MathVerify
from align.tools.registry import UnknownNameError


def length_reward(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


class Constant(RewardFunction):
    name = "constant"

    def __init__(self, value: float = 1.0):
        self.value = value

    def score(self, prompts, completions, **columns):
        return RewardOutput(scores=[self.value] * len(completions))


@pytest.fixture
def scratch_names():
    added = []
    yield added
    for name in added:
        REWARDS.unregister(name)


def test_builtin_names_instantiate_with_kwargs():
    assert {"math_verify", "code_tests", "format", "themis", "classifier_rm"} <= set(REWARDS.names())
    m = get_reward("math_verify", timeout_s=2.5)
    assert isinstance(m, MathVerify) and m.timeout_s == 2.5
    assert isinstance(get_reward("code_tests"), CodeTests)
    f = get_reward({"name": "format", "kwargs": {"pattern": "^A", "mode": "match"}})
    assert isinstance(f, FormatReward) and f.score(["", ""], ["Abc", "bA"]).scores == [1.0, 0.0]
    assert isinstance(get_reward("math"), MathVerify)  # alias


def test_unknown_name_suggests_the_close_one():
    with pytest.raises(UnknownNameError, match="did you mean 'math_verify'"):
        get_reward("math_verfy")


def test_bad_kwargs_list_the_accepted_ones():
    with pytest.raises(TypeError, match="timeout_s"):
        get_reward("math_verify", timeout=3)


def test_register_class_function_factory_and_duplicates(scratch_names):
    register_reward("test_constant", Constant)
    register_reward("test_length", length_reward)

    @register_reward("test_factory")
    @reward_factory
    def make(scale: float = 2.0):
        return Constant(value=scale * 3)

    scratch_names += ["test_constant", "test_length", "test_factory"]
    assert get_reward("test_constant", value=4.0).score(["", ""], ["a", "b"]).scores == [4.0, 4.0]
    length = get_reward("test_length")
    assert isinstance(length, CallableReward) and length(["", ""], ["ab", "abcd"]) == [2.0, 4.0]
    assert get_reward("test_factory", scale=0.5).value == 1.5
    with pytest.raises(TypeError, match="plain function"):
        get_reward("test_length", foo=1)
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_constant", Constant)


def test_lazy_entries_import_only_when_asked(scratch_names):
    register_reward("test_lazy", LazyReward("align.rewards.verifiers:FormatReward"))
    register_reward("test_lazy_missing", LazyReward("align.rewards.verifiers:Nope"))
    scratch_names += ["test_lazy", "test_lazy_missing"]
    assert get_reward("test_lazy", pattern="x+").pattern == "x+"
    with pytest.raises(ImportError, match="Nope"):
        get_reward("test_lazy_missing")


def test_import_path_and_objects():
    assert get_reward("align.rewards.verifiers:FormatReward", match_score=2.0).match_score == 2.0
    c = Constant()
    assert get_reward(c) is c
    assert get_reward(length_reward)(["x"], ["abc"]) == [3.0]
    with pytest.raises(UnknownNameError, match="cannot import"):
        get_reward("no_such_module_xyz:thing")


def test_entry_point_plugins(monkeypatch, scratch_names):
    ep = metadata.EntryPoint(name="test_plugin", value="align.rewards.verifiers:FormatReward", group="align.rewards")
    real = metadata.entry_points

    def fake(**kw):
        return [ep] if kw.get("group") == "align.rewards" else real(**kw)

    monkeypatch.setattr(metadata, "entry_points", fake)
    monkeypatch.setattr(REWARDS, "_entry_points_loaded", False)
    scratch_names.append("test_plugin")
    assert get_reward("test_plugin", miss_score=-1.0).miss_score == -1.0


def test_package_exports_are_lazy_and_pickle():
    assert rewards.get_reward is get_reward
    assert "RemoteReward" in rewards.__all__ and "RewardMixture" in dir(rewards)
    with pytest.raises(AttributeError):
        rewards.not_a_thing  # noqa: B018
    for name in ("math_verify", "code_tests", "format"):
        clone = pickle.loads(pickle.dumps(get_reward(name)))
        assert type(clone) is type(get_reward(name))


def test_lazy_builtin_reward_models_point_at_real_classes():
    for name, target in (("themis", "ServedThemis"), ("classifier_rm", "ClassifierRewardModel"),
                         ("understanding", "UnderstandingReward")):
        entry = REWARDS.get(name)
        assert isinstance(entry, LazyReward)
        cls = entry.load()
        assert cls.__name__ == target and issubclass(cls, RewardFunction)


class ScaledLength:
    """A TRL-style reward class (not a RewardFunction): built with arguments, its instances score."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def __call__(self, prompts, completions, **kwargs):
        return [self.scale * len(c) for c in completions]


class NotCallable:
    def __init__(self, scale: float = 1.0):
        self.scale = scale


def test_a_plain_reward_class_named_by_import_path_is_built_with_its_kwargs_and_scores():
    path = f"{__name__}:ScaledLength"
    assert get_reward(path, scale=2.0).score(["p", "q"], ["abc", "a"]).scores == [6.0, 2.0]
    assert get_reward(path).score(["p"], ["abcd"]).scores == [4.0]
    assert get_reward({"name": path, "kwargs": {"scale": 0.5}}).score(["p"], ["ab"]).scores == [1.0]
    with pytest.raises(TypeError, match=r"its arguments are: scale"):
        get_reward(path, sclae=2.0)
    with pytest.raises(TypeError, match=r"instances are not callable: give it __call__"):
        get_reward(f"{__name__}:NotCallable")
