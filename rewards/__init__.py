"""Rewards: the protocol, built-in verifiers and reward models, mixing, Ray workers, the HTTP service.

`from align.rewards import RewardFunction, get_reward, register_reward, RemoteReward`. Everything beyond the
protocol loads on first access (module `__getattr__`), so importing `rewards` stays cheap and the reward
models (torch, transformers) load only when one is used.
"""
from __future__ import annotations

if __name__ != "align.rewards":  # imported as bare `rewards` from a checkout: see align/_bare_names.py
    from align._bare_names import hand_over

    hand_over(__name__, __file__)
else:
    import importlib
    import importlib.util
    from typing import Any

    from align.rewards.base import CallableReward, RewardFunction, RewardOutput, as_reward_function

    # public name -> module that defines it (imported on first access)
    _LAZY = {
        "get_reward": "align.rewards.registry",
        "register_reward": "align.rewards.registry",
        "reward_names": "align.rewards.registry",
        "reward_factory": "align.rewards.registry",
        "LazyReward": "align.rewards.registry",
        "REWARDS": "align.rewards.registry",
        "MathVerify": "align.rewards.verifiers",
        "CodeTests": "align.rewards.verifiers",
        "FormatReward": "align.rewards.verifiers",
        "RewardMixture": "align.rewards.mixture",
        "RunningMeanStd": "align.rewards.mixture",
        "TRLRewardFunc": "align.rewards.adapters",
        "VerlReward": "align.rewards.adapters",
        "VerlComputeScore": "align.rewards.adapters",
        "from_trl": "align.rewards.adapters",
        "to_trl": "align.rewards.adapters",
        "from_verl": "align.rewards.adapters",
        "to_verl": "align.rewards.adapters",
        "RewardWorker": "align.rewards.worker",
        "RemoteReward": "align.rewards.client",
        "RemoteRewardError": "align.rewards.client",
        "create_app": "align.rewards.service",
        "serve": "align.rewards.service",
        # the reward models and intrinsic rewards: torch and transformers load only when used
        "ClassifierRewardModel": "align.rewards.classifier",
        "ThemisRewardModel": "align.rewards.themis",
        "ServedThemis": "align.rewards.themis_served",
        "CuriosityModule": "align.rewards.curiosity",
        "UnderstandingReward": "align.rewards.understanding",
        "train_reward_model": "align.rewards.training",
        "evaluate_reward_model": "align.rewards.training",
    }

    __all__ = ["RewardFunction", "RewardOutput", "CallableReward", "as_reward_function",
               # names whose module is part of this build (the reward models may be absent)
               *(n for n, m in _LAZY.items() if importlib.util.find_spec(m) is not None)]


    def __getattr__(name: str) -> Any:
        module_name = _LAZY.get(name)
        if module_name is None:
            raise AttributeError(f"module 'align.rewards' has no attribute {name!r}")
        value = getattr(importlib.import_module(module_name), name)
        globals()[name] = value
        return value


    def __dir__() -> list[str]:
        return sorted(__all__)
