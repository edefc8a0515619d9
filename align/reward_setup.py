"""Build the run's reward from `config.reward`: registered names, import paths, callables, a remote service."""
from __future__ import annotations

from typing import Any

from align.config import RewardConfig
from align.errors import UserError
from align.rewards.base import RewardFunction, RewardInputError


def build_reward(cfg: RewardConfig) -> RewardFunction:
    """A RewardMixture of the configured functions (weights from `weights` or each entry's `weight`)."""
    from align.rewards.mixture import RewardMixture
    from align.rewards.registry import get_reward

    components: list[tuple[RewardFunction, float]] = []
    for i, item in enumerate(cfg.functions):
        weight = cfg.weights[i] if cfg.weights else 1.0
        spec: Any = item
        if isinstance(item, dict):
            weight = float(item.get("weight", weight))
            spec = {"name": item["name"], "kwargs": item.get("kwargs") or {}}
        try:
            components.append((get_reward(spec), weight))
        except (TypeError, ValueError, ImportError) as err:
            raise UserError(f"reward.functions[{i}]: {err}") from None
    if cfg.remote_url:
        from align.rewards.client import RemoteReward

        components.append((RemoteReward(cfg.remote_url, token=cfg.remote_token or None), 1.0))
    return RewardMixture(components, normalize=cfg.normalize, clip=cfg.clip, normalize_by=cfg.normalize_by)


def bind_policy(reward: RewardFunction, policy, tokenizer, disable_adapters=None) -> None:
    """Give rewards that score with the policy itself (GvU's understanding reward) the live model."""
    for component in getattr(reward, "rewards", [reward]):
        if hasattr(component, "bind_policy"):
            component.bind_policy(policy, tokenizer, disable_adapters=disable_adapters)


def check_reward_columns(reward: RewardFunction, columns: list[str], prompt_key: str) -> None:
    """Refuse at start-up a reward whose required column the data lacks (one line, not a step-1 traceback)."""
    present = set(columns) - {prompt_key}  # the prompt reaches rewards as `prompts`, not as a column
    for component in getattr(reward, "rewards", [reward]):
        for options in component.required_columns():
            if not present.intersection(options):
                need = " / ".join(repr(c) for c in options)
                raise RewardInputError(f"reward {getattr(component, 'name', type(component).__name__)!r} needs a "
                                       f"{need} column; the data has {', '.join(sorted(columns)) or 'none'}: add "
                                       "the column to the data (or rename one to it)")
