"""Rewards by name: `get_reward("math_verify", timeout_s=2)` and `register_reward("mine", MyReward)`.

A registry entry is a RewardFunction subclass (instantiated with the kwargs), a factory returning a
RewardFunction, a TRL-style callable `fn(prompts, completions, **columns)` (wrapped in CallableReward), or a
`LazyReward("module:attr")` that imports its target only when asked (the reward models pull in torch and
transformers, so `themis` and `classifier_rm` load lazily). Third-party rewards arrive through the
entry-point group `align.rewards`.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

from align.rewards.base import CallableReward, RewardFunction
from align.tools.registry import Registry, UnknownNameError

ENTRY_POINT_GROUP = "align.rewards"

REWARDS: Registry[Any] = Registry("reward", entry_point_group=ENTRY_POINT_GROUP)


@dataclass(frozen=True)
class LazyReward:
    """A registry entry resolved on first use: `target` is "package.module:attribute"."""

    target: str

    def load(self) -> Any:
        module_name, _, attr = self.target.partition(":")
        module = importlib.import_module(module_name)
        try:
            return getattr(module, attr)
        except AttributeError:
            raise ImportError(f"{module_name} has no attribute {attr!r} (registered as reward {self.target!r})") from None


def register_reward(name: str, obj: Any = None, *, aliases: tuple[str, ...] = (), overwrite: bool = False):
    """Register a RewardFunction class, a factory, a TRL-style callable or a LazyReward under `name`.
    Usable as a decorator: `@register_reward("mine")`. Duplicate names are rejected unless overwrite=True."""
    return REWARDS.register(name, obj, aliases=aliases, overwrite=overwrite)


def _instantiate(entry: Any, name: str, kwargs: dict[str, Any]) -> RewardFunction:
    if isinstance(entry, LazyReward):
        entry = entry.load()
    if isinstance(entry, RewardFunction):
        if kwargs:
            raise TypeError(f"reward {name!r} is a ready-made instance and takes no arguments (got {sorted(kwargs)})")
        return entry
    if inspect.isclass(entry):  # a RewardFunction subclass, or a TRL-style class whose instances score
        return _wrap_callable(_construct(entry, name, kwargs), name)
    if callable(entry):
        factory = getattr(entry, "__align_reward_factory__", False)
        if factory:
            out = entry(**kwargs)
            if not isinstance(out, RewardFunction):
                raise TypeError(f"reward factory {name!r} returned {type(out).__name__}, not a RewardFunction")
            return out
        if kwargs:
            raise TypeError(f"reward {name!r} is a plain function fn(prompts, completions, **columns) and takes no "
                            f"arguments (got {sorted(kwargs)})")
        return _wrap_callable(entry, name)
    raise TypeError(f"reward {name!r} is registered as a {type(entry).__name__}; expected a RewardFunction class, "
                    "a factory or a callable")


def _construct(cls: type, name: str, kwargs: dict[str, Any]) -> Any:
    try:
        obj = cls(**kwargs)
    except TypeError as err:
        params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
        raise TypeError(f"reward {name!r}: {err}; its arguments are: {', '.join(params) or 'none'}") from None
    if isinstance(obj, RewardFunction):
        return obj
    if not callable(obj):
        raise TypeError(f"reward {name!r} is a class whose instances are not callable: give it "
                        "__call__(self, prompts, completions, **columns) or subclass align.rewards.RewardFunction")
    return obj


def _wrap_callable(fn: Any, name: str) -> RewardFunction:
    if isinstance(fn, RewardFunction):
        return fn
    from align.rewards.adapters import VerlReward, is_verl_compute_score

    if is_verl_compute_score(fn):  # verl's compute_score(data_source, solution_str, ground_truth, extra_info)
        return VerlReward(fn, name=name)
    return CallableReward(fn, name=name)


def reward_factory(fn):
    """Mark `fn(**kwargs) -> RewardFunction` as a factory, so the registry calls it with the kwargs instead of
    treating it as a TRL-style reward callable."""
    fn.__align_reward_factory__ = True
    return fn


def get_reward(spec: Any, **kwargs: Any) -> RewardFunction:
    """A RewardFunction from a registered name, a "module:attr" import path, a {"name": ..., "kwargs": {...}}
    dict, a RewardFunction (returned as is) or a TRL-style callable (wrapped)."""
    if isinstance(spec, RewardFunction):
        if kwargs:
            raise TypeError(f"get_reward got a RewardFunction instance ({spec.name!r}) and extra arguments {sorted(kwargs)}")
        return spec
    if isinstance(spec, dict):
        unknown = set(spec) - {"name", "kwargs"}
        if "name" not in spec or unknown:
            raise ValueError(f"a reward spec dict needs 'name' and optional 'kwargs' (got keys {sorted(spec)})")
        return get_reward(spec["name"], **{**dict(spec.get("kwargs") or {}), **kwargs})
    if isinstance(spec, str):
        if spec in REWARDS or ":" not in spec:
            return _instantiate(REWARDS.get(spec), spec, kwargs)
        try:
            target = LazyReward(spec).load()
        except (ImportError, ValueError) as err:
            raise UnknownNameError(f"unknown reward {spec!r}: cannot import it ({err})") from None
        return _instantiate(target, spec, kwargs)
    if callable(spec):
        return _instantiate(spec, getattr(spec, "__name__", type(spec).__name__), kwargs)
    raise TypeError(f"a reward must be a name, a 'module:attr' path, a RewardFunction or a callable; got {type(spec).__name__}")


def reward_names() -> list[str]:
    return REWARDS.names()


def _register_builtins() -> None:
    from align.rewards.verifiers import CodeTests, FormatReward, MathVerify

    register_reward("math_verify", MathVerify, aliases=("math",))
    register_reward("code_tests", CodeTests, aliases=("code",))
    register_reward("format", FormatReward)
    register_reward("verl", LazyReward("align.rewards.adapters:verl_reward"))  # kwargs: compute_score
    # reward models: torch / transformers are imported only when one is asked for
    register_reward("themis", LazyReward("align.rewards.themis_served:ServedThemis"))  # ThemisRewardModel, lazily loaded
    register_reward("classifier_rm", LazyReward("align.rewards.classifier:ClassifierRewardModel"), aliases=("classifier",))
    register_reward("understanding", LazyReward("align.rewards.understanding:UnderstandingReward"), aliases=("gvu",))


_register_builtins()

__all__ = ["REWARDS", "ENTRY_POINT_GROUP", "LazyReward", "get_reward", "register_reward", "reward_factory", "reward_names"]
