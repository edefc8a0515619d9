"""Rewards: the protocol, built-in verifiers and reward models, mixing, Ray workers, the HTTP service.

`from rewards import RewardFunction, get_reward, register_reward, RemoteReward`. Everything beyond the
protocol loads on first access (module `__getattr__`), so importing `rewards` stays cheap and the reward
models (torch, transformers) load only when one is used.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from rewards.base import CallableReward, RewardFunction, RewardOutput, as_reward_function

# public name -> module that defines it (imported on first access)
_LAZY = {
    "get_reward": "rewards.registry",
    "register_reward": "rewards.registry",
    "reward_names": "rewards.registry",
    "reward_factory": "rewards.registry",
    "LazyReward": "rewards.registry",
    "REWARDS": "rewards.registry",
    "MathVerify": "rewards.verifiers",
    "CodeTests": "rewards.verifiers",
    "FormatReward": "rewards.verifiers",
    "RewardMixture": "rewards.mixture",
    "RunningMeanStd": "rewards.mixture",
    "TRLRewardFunc": "rewards.adapters",
    "VerlReward": "rewards.adapters",
    "VerlComputeScore": "rewards.adapters",
    "from_trl": "rewards.adapters",
    "to_trl": "rewards.adapters",
    "from_verl": "rewards.adapters",
    "to_verl": "rewards.adapters",
    "RewardWorker": "rewards.worker",
    "RemoteReward": "rewards.client",
    "RemoteRewardError": "rewards.client",
    "create_app": "rewards.service",
    "serve": "rewards.service",
    # the reward models and intrinsic rewards: torch and transformers load only when used
    "ClassifierRewardModel": "rewards.classifier",
    "ThemisRewardModel": "rewards.themis",
    "CuriosityModule": "rewards.curiosity",
    "UnderstandingReward": "rewards.understanding",
    "train_reward_model": "rewards.training",
    "evaluate_reward_model": "rewards.training",
}

__all__ = ["RewardFunction", "RewardOutput", "CallableReward", "as_reward_function",
           # names whose module is part of this build (the reward models may be absent)
           *(n for n, m in _LAZY.items() if importlib.util.find_spec(m) is not None)]


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'rewards' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
