"""RewardWorker: hosts any reward function, in-process or as a Ray actor.

In-process:   w = RewardWorker("math_verify"); out = w.score({"prompts": [...], "completions": [...], "label": [...]})
As an actor:  a = RewardWorker.as_actor("math_verify", num_cpus=1, max_restarts=2, max_task_retries=2)
              out = ray.get(a.score.remote(batch))          # or ray.remote(RewardWorker).remote(spec)

Ray may report "actor died" although the task ran, and retries re-send the same batch; a restart re-runs the
constructor. Scoring is therefore idempotent by sample id: pass `sample_ids` in the batch and a sample already
scored (without error) is answered from an LRU cache instead of being scored again.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any

from align.rewards.base import RewardFunction, RewardOutput


def _build(reward_spec: Any, reward_kwargs: dict[str, Any] | None) -> RewardFunction:
    from align.rewards.registry import get_reward

    return get_reward(reward_spec, **(reward_kwargs or {}))


class RewardWorker:
    """Scores batches with one reward function. reward_spec: a registered name, a "module:attr" path, a
    {"name", "kwargs"} dict, a RewardFunction or a TRL-style callable (must pickle to reach an actor).

    batch: {"prompts": [N], "completions": [N], "sample_ids"?: [N], "columns"?: {name: [N]}, other keys = columns}
    """

    def __init__(self, reward_spec: Any, reward_kwargs: dict[str, Any] | None = None, cache_size: int = 65_536):
        self.reward = _build(reward_spec, reward_kwargs)
        self.cache_size = cache_size
        self._cache: OrderedDict[Any, tuple[float | None, dict[str, Any], list[float] | None]] = OrderedDict()
        self._lock = threading.Lock()
        self.samples_scored = 0  # samples actually sent to the reward (cache misses)

    @classmethod
    def as_actor(cls, reward_spec: Any, reward_kwargs: dict[str, Any] | None = None, *, num_cpus: float = 1,
                 num_gpus: float = 0, max_restarts: int = 2, max_task_retries: int = 2, **options: Any):
        """A Ray actor handle running RewardWorker(reward_spec). Restarts and task retries are on by default
        (Ray's defaults are none); retried tasks are cheap thanks to the sample-id cache."""
        import ray

        actor_cls = ray.remote(cls)
        return actor_cls.options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                                 max_task_retries=max_task_retries, **options).remote(reward_spec, reward_kwargs)

    @staticmethod
    def _unpack(batch: dict[str, Any]) -> tuple[list[Any], list[Any], list[Any] | None, dict[str, list[Any]]]:
        if not isinstance(batch, dict) or "completions" not in batch:
            raise ValueError("RewardWorker.score takes a dict with 'completions' (and 'prompts', 'sample_ids', columns)")
        completions = list(batch["completions"])
        n = len(completions)
        prompts = list(batch.get("prompts") or [""] * n)
        ids = batch.get("sample_ids")
        columns = dict(batch.get("columns") or {})
        columns.update({k: v for k, v in batch.items() if k not in ("prompts", "completions", "sample_ids", "columns")})
        for key, values in [("prompts", prompts), ("sample_ids", ids), *columns.items()]:
            if values is not None and len(values) != n:
                raise ValueError(f"RewardWorker: {key!r} has {len(values)} entries for {n} completions")
        return prompts, completions, None if ids is None else list(ids), {k: list(v) for k, v in columns.items()}

    def score(self, batch: dict[str, Any]) -> RewardOutput:
        prompts, completions, ids, columns = self._unpack(batch)
        n = len(completions)
        if ids is None:
            with self._lock:
                self.samples_scored += n
            return self.reward.score(prompts, completions, **columns)
        with self._lock:
            todo = [i for i in range(n) if ids[i] not in self._cache]
        fresh = None
        if todo:
            sub = {k: [v[i] for i in todo] for k, v in columns.items()}
            fresh = self.reward.score([prompts[i] for i in todo], [completions[i] for i in todo], **sub)
            if len(fresh) != len(todo):
                raise ValueError(f"reward {self.reward.name!r} returned {len(fresh)} scores for {len(todo)} samples")
        scores: list[float | None] = [None] * n
        errors: list[str | None] = [None] * n
        infos: list[dict[str, Any]] = [{} for _ in range(n)]
        tokens: list[list[float] | None] = [None] * n
        with self._lock:
            self.samples_scored += len(todo)
            for j, i in enumerate(todo):
                scores[i], errors[i], infos[i] = fresh.scores[j], fresh.errors[j], fresh.info[j]
                tokens[i] = fresh.token_rewards[j] if fresh.token_rewards is not None else None
                # errors are not cached: a retry may succeed where a timeout failed
                if errors[i] is None:
                    self._cache[ids[i]] = (scores[i], infos[i], tokens[i])
                    self._cache.move_to_end(ids[i])
            fresh_rows = set(todo)
            for i in range(n):
                if i in fresh_rows:
                    continue
                hit = self._cache.get(ids[i])
                if hit is None:  # evicted between the two locks (cache smaller than the batch)
                    raise RuntimeError(f"RewardWorker: cache_size {self.cache_size} is smaller than the batch; raise it")
                scores[i], infos[i], tokens[i] = hit
                self._cache.move_to_end(ids[i])
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        has_tokens = any(t is not None for t in tokens)
        if has_tokens and any(t is None for t, e in zip(tokens, errors) if e is None):
            raise ValueError(f"reward {self.reward.name!r} gave token rewards for some samples only")
        return RewardOutput(scores=scores, errors=errors, info=infos,
                            token_rewards=[t or [] for t in tokens] if has_tokens else None,
                            metrics=dict(fresh.metrics) if fresh is not None else {})

    def health(self) -> dict[str, Any]:
        return {"reward": self.reward.name, "pid": os.getpid(), "cached": len(self._cache),
                "samples_scored": self.samples_scored}

    def close(self) -> None:
        self.reward.close()


__all__ = ["RewardWorker"]
