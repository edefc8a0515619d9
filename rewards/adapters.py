"""Adapters between our RewardFunction and the two conventions users bring:

- TRL: `fn(prompts, completions, **kwargs) -> list[float | None]` (completions may be conversational:
  lists of {"role", "content"} messages). `from_trl(fn)` wraps one; `to_trl(reward)` gives a callable TRL's
  GRPOTrainer accepts (errors become None, which TRL leaves out of the sum, or raise).
- verl: `compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | dict` (a dict
  carries "score" and extra fields). `from_verl(fn)` scores a batch sample by sample; `to_verl(reward)`
  gives a `compute_score` built on any RewardFunction.
All adapters are callable classes (not closures), so they pickle and ship to Ray actors.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

from align.errors import UserError
from align.rewards.base import (
    CallableReward,
    RewardFunction,
    RewardInputError,
    RewardOutput,
    as_reward_function,
    completion_text,
)

log = logging.getLogger(__name__)


def _text(completion: Any) -> str:
    return completion_text(completion, strict=True)


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):  # a conversation: join the contents
        return "\n".join(str(m.get("content", "")) for m in prompt if isinstance(m, dict))
    return _text(prompt) if prompt is not None else ""


def from_trl(fn: Callable[..., Sequence[float | None]], name: str | None = None) -> RewardFunction:
    """A RewardFunction from a TRL-style callable (exceptions propagate: they are infrastructure failures)."""
    return as_reward_function(fn, name=name)


class TRLRewardFunc:
    """A TRL reward function backed by a RewardFunction: `f(prompts, completions, **kwargs) -> list[float|None]`.

    Conversational prompts / completions are reduced to their text. TRL passes extra arguments
    (completion_ids, trainer_state, ...) that are not dataset columns; they are dropped. A sample error
    becomes None (TRL excludes it from the weighted sum) and is logged, or raises with on_error="raise".
    """

    _NOT_COLUMNS = ("completion_ids", "trainer_state", "log_extra", "log_metric", "environments")

    def __init__(self, reward: Any, on_error: str = "none"):
        if on_error not in ("none", "raise"):
            raise ValueError(f"to_trl: on_error must be 'none' or 'raise', got {on_error!r}")
        self.reward = as_reward_function(reward)
        self.on_error = on_error
        self.__name__ = self.reward.name  # TRL logs each reward function under its __name__

    def __call__(self, prompts: Sequence[Any] = (), completions: Sequence[Any] = (), **kwargs: Any) -> list[float | None]:
        columns = {k: v for k, v in kwargs.items() if k not in self._NOT_COLUMNS}
        completions = [_text(c) for c in completions]
        prompts = [_prompt_text(p) for p in prompts] if prompts else [""] * len(completions)
        out = self.reward.score(prompts, completions, **columns)
        failed = [(i, e) for i, e in enumerate(out.errors) if e is not None]
        if failed:
            if self.on_error == "raise":
                i, e = failed[0]
                raise RuntimeError(f"reward {self.reward.name!r} failed on {len(failed)} of {len(out)} samples "
                                   f"(sample {i}: {e})")
            log.warning("reward %r: %d of %d samples errored (scored None); first: %s",
                        self.reward.name, len(failed), len(out), failed[0][1])
        return list(out.scores)


def to_trl(reward: Any, on_error: str = "none") -> TRLRewardFunc:
    return TRLRewardFunc(reward, on_error=on_error)


class VerlReward(RewardFunction):
    """Scores a batch with a verl-style `compute_score(data_source, solution_str, ground_truth, extra_info)`.

    Columns: `data_source` (default `default_data_source`), the ground truth from `ground_truth` / `label` /
    `answer` (or `reward_model` dicts with a "ground_truth" key, verl's parquet layout), `extra_info` (optional).
    A returned dict gives "score" and the rest goes to info. An exception or a non-numeric result is an error
    for that sample (verl's habit of turning failures into 0.0 is not followed).
    """

    def __init__(self, compute_score: Callable[..., Any], name: str | None = None, default_data_source: str = "default"):
        if not callable(compute_score):
            raise TypeError(f"compute_score must be callable, got {type(compute_score).__name__}")
        self.compute_score = compute_score
        self.name = name or getattr(compute_score, "__name__", "compute_score")
        self.default_data_source = default_data_source

    def required_columns(self) -> list[tuple[str, ...]]:
        return [("ground_truth", "label", "answer", "reward_model")]

    @staticmethod
    def _ground_truths(columns: dict[str, Any], n: int) -> list[Any]:
        for key in ("ground_truth", "label", "answer"):
            if columns.get(key) is not None:
                return list(columns[key])
        if columns.get("reward_model") is not None:
            return [rm.get("ground_truth") if isinstance(rm, dict) else None for rm in columns["reward_model"]]
        raise RewardInputError("a verl compute_score needs a 'ground_truth' (or 'label' / 'answer' / 'reward_model') "
                               "column; add it to the dataset")

    def score(self, prompts, completions, **columns) -> RewardOutput:
        n = len(completions)
        truths = self._ground_truths(columns, n)
        sources = list(columns.get("data_source") or [self.default_data_source] * n)
        extras = list(columns.get("extra_info") or [None] * n)
        for key, values in (("ground truth", truths), ("data_source", sources), ("extra_info", extras)):
            if len(values) != n:
                raise ValueError(f"{self.name}: {key} column has {len(values)} values for {n} completions")
        scores, errors, infos = [], [], []
        for i in range(n):
            try:
                result = self.compute_score(sources[i], _text(completions[i]), truths[i], extras[i])
            except Exception as err:  # noqa: BLE001 - reported as this sample's error
                scores.append(None)
                errors.append(f"compute_score raised {type(err).__name__}: {err}"[:300])
                infos.append({})
                continue
            info: dict[str, Any] = {}
            if isinstance(result, dict):
                info = {k: v for k, v in result.items() if k != "score"}
                result = result.get("score")
            if isinstance(result, bool) or not isinstance(result, (int, float)):
                scores.append(None)
                errors.append(f"compute_score returned {type(result).__name__}, expected a number or a dict with 'score'")
            else:
                scores.append(float(result))
                errors.append(None)
            infos.append(info)
        return RewardOutput(scores=scores, errors=errors, info=infos)


def from_verl(compute_score: Callable[..., Any], name: str | None = None, default_data_source: str = "default") -> VerlReward:
    return VerlReward(compute_score, name=name, default_data_source=default_data_source)


def is_verl_compute_score(fn: Any) -> bool:
    """Whether `fn` has verl's compute_score signature (solution_str and ground_truth, no completions), so a
    plain function listed in reward.functions is scored verl's way instead of being called TRL's way."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "solution_str" in params and "ground_truth" in params and "completions" not in params


def load_compute_score(spec: Any) -> Callable[..., Any]:
    """A callable as is; "package.module:attr"; or verl's custom_reward_function as "path/to/file.py:attr"."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or ":" not in spec:
        raise UserError(f"reward 'verl': compute_score must be 'module:function' or 'file.py:function', got {spec!r}")
    where, _, attr = spec.rpartition(":")
    if where.endswith(".py"):
        if not Path(where).is_file():
            raise UserError(f"reward 'verl': {where!r} does not exist; give the path of the file defining {attr}")
        module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"reward 'verl': {where} has no function {attr!r}; name the compute_score function after ':'")
    return fn


def verl_reward(compute_score: Any = "", default_data_source: str = "default", name: str | None = None) -> VerlReward:
    """The `verl` reward kind: `{"name": "verl", "kwargs": {"compute_score": "my_reward.py:compute_score"}}`."""
    if not compute_score:
        raise UserError("reward 'verl' needs kwargs.compute_score: 'module:function' or 'file.py:function'")
    return VerlReward(load_compute_score(compute_score), name=name, default_data_source=default_data_source)


verl_reward.__align_reward_factory__ = True  # the registry calls it with the kwargs (align.rewards.registry)


class VerlComputeScore:
    """verl's `compute_score(data_source, solution_str, ground_truth, extra_info=None) -> dict` built on a
    RewardFunction: {"score": float, **info}. The ground truth goes in as the `label` column, data_source and
    extra_info as columns of their own; extra_info["prompt"] (if present) is the prompt. A sample error raises
    (verl would otherwise log a silent 0.0)."""

    def __init__(self, reward: Any):
        self.reward = as_reward_function(reward)
        self.__name__ = "compute_score"

    def __call__(self, data_source: Any, solution_str: str, ground_truth: Any, extra_info: Any = None) -> dict[str, Any]:
        prompt = extra_info.get("prompt", "") if isinstance(extra_info, dict) else ""
        out = self.reward.score([prompt], [solution_str], label=[ground_truth], data_source=[data_source],
                                extra_info=[extra_info])
        if out.errors[0] is not None or out.scores[0] is None:
            raise RuntimeError(f"reward {self.reward.name!r}: {out.errors[0] or 'not applicable to this sample'}")
        score = out.scores[0]
        if not math.isfinite(score):  # RewardOutput already forbids it; kept as a guard for subclasses
            raise RuntimeError(f"reward {self.reward.name!r}: non-finite score")
        return {"score": score, **{k: v for k, v in out.info[0].items() if k != "score"}}


def to_verl(reward: Any) -> VerlComputeScore:
    return VerlComputeScore(reward)


__all__ = ["CallableReward", "TRLRewardFunc", "VerlReward", "VerlComputeScore", "from_trl", "to_trl", "from_verl", "to_verl",
           "is_verl_compute_score", "load_compute_score", "verl_reward"]
