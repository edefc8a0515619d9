"""The reward protocol: what every reward function returns, and how plain callables are adapted.

A reward is either a TRL-style callable `fn(prompts, completions, **columns) -> list[float | None]`
(None = not applicable to this sample) or a `RewardFunction` subclass that can also return per-token
rewards, an `info` dict and an explicit error per sample. The trainer only ever sees `RewardOutput`.
"""
from __future__ import annotations

import inspect
import math
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from align.errors import UserError
from align.rewards.trl_kwargs import (
    PROMPT_MESSAGES,
    TRAINER_STATE,
    TRAJECTORY,
    TRL_CALL_KEYS,
    conversational,
    is_async_callable,
    prompt_text,
    run_awaitables,
)


@dataclass
class RewardOutput:
    """Scores for one batch of N samples.

    scores:        [N] float, or None where the reward does not apply or the sample errored
    errors:        [N] None, or a one-line message saying why this sample has no score
    info:          [N] dicts of per-sample details (tool traces, per-token log-probs, ...)
    token_rewards: optional [N] lists of per-response-token rewards (added to the KL-shaped rewards)
    """

    scores: list[float | None]
    errors: list[str | None] = field(default_factory=list)
    info: list[dict[str, Any]] = field(default_factory=list)
    token_rewards: list[list[float]] | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # batch scalars a reward logged (TRL's log_metric)

    def __post_init__(self) -> None:
        n = len(self.scores)
        if not self.errors:
            self.errors = [None] * n
        if not self.info:
            self.info = [{} for _ in range(n)]
        if len(self.errors) != n or len(self.info) != n:
            raise ValueError(f"RewardOutput: scores ({n}), errors ({len(self.errors)}) and info ({len(self.info)}) differ in length")
        if self.token_rewards is not None and len(self.token_rewards) != n:
            raise ValueError(f"RewardOutput: token_rewards has {len(self.token_rewards)} rows for {n} samples")
        # Non-finite scores are errors for that sample: NaN must never reach advantages. Finite means finite in
        # float32 too, the dtype scores train in: 1e39 is a finite Python float but inf as a training tensor.
        for i, s in enumerate(self.scores):
            if s is None:
                continue
            problem = score_problem(s)
            if problem is not None:
                self.errors[i] = self.errors[i] or problem
                self.scores[i] = None
            else:
                self.scores[i] = float(s)

    def __len__(self) -> int:
        return len(self.scores)


FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max


def finite_in_float32(value: float) -> bool:
    """Whether `value` is finite and stays finite as a float32 (the dtype scores and token rewards train in)."""
    value = float(value)
    if not math.isfinite(value):
        return False
    try:
        struct.pack("<f", value)  # the C cast to float; OverflowError exactly when it would give inf
    except OverflowError:
        return False
    return True


def score_problem(value: Any) -> str | None:
    """None for a usable score, else the one-line per-sample error (NaN, inf, or out of float32 range)."""
    as_float = float(value)
    if not math.isfinite(as_float):
        return f"non-finite score {value!r}"
    if not finite_in_float32(as_float):
        return (f"score {as_float!r} is not finite in float32 (the training dtype of scores; |score| must stay "
                f"below {FLOAT32_MAX:.4g})")
    return None


class RewardInputError(UserError, ValueError):
    """The reward asks for something the data does not have (e.g. a missing dataset column): a user's fix."""


# what the trainer (TRL's keyword set) passes to rewards itself: never a dataset column to ask for
TRAINER_KEYWORDS = frozenset({"prompts", "completions", "completion_ids", "stop_reason", "trainer_state",
                              "log_metric", "log_extra", "trajectory"})


class RewardFunction(ABC):
    """Base class for batched rewards. Subclasses implement `score`; `__call__` is TRL-compatible."""

    name: str = "reward"

    @abstractmethod
    def score(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> RewardOutput:
        """Score N (prompt, completion) pairs; dataset columns arrive as lists of length N."""

    @property
    def __name__(self) -> str:  # TRL's GRPOTrainer names (and logs) each reward function by its __name__
        return self.name

    def __call__(self, prompts: Sequence[Any] | None = None, completions: Sequence[Any] = (),
                 **kwargs: Any) -> list[float | None]:
        """TRL-compatible: usable as one of GRPOTrainer's reward_funcs. TRL's call context (trainer_state,
        log_metric, log_extra, environments) is not data and is dropped; conversational prompts and completions
        are reduced to text (a completion's last message's content)."""
        columns = {k: v for k, v in kwargs.items() if k not in TRL_CALL_KEYS}
        texts = [completion_text(c) for c in completions]
        if prompts is not None and any(isinstance(p, list) for p in prompts):
            # the original messages travel as the context column, so TRL-style rewards behind this one (a
            # RemoteReward's service, a mixture) get them back as message lists
            columns.setdefault(PROMPT_MESSAGES, [p if isinstance(p, list) else None for p in prompts])
        prompts = [prompt_text(p) for p in prompts] if prompts is not None else [""] * len(texts)
        return self.score(prompts, texts, **columns).scores

    def required_columns(self) -> list[tuple[str, ...]]:
        """Dataset columns this reward cannot score without, checked at start-up: each entry names
        alternatives (any one will do)."""
        return []

    def close(self) -> None:
        """Release resources (pools, servers, models)."""


class CallableReward(RewardFunction):
    """Adapts a TRL-style callable `fn(prompts, completions, **kwargs) -> list[float | None]`.

    An exception inside `fn` is an infrastructure failure: it is raised, never turned into zeros.
    """

    def __init__(self, fn: Callable[..., Sequence[float | None]], name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    @property
    def is_async(self) -> bool:
        return is_async_callable(self.fn)

    def score(self, prompts, completions, **columns) -> RewardOutput:
        kwargs, sink = self.call_kwargs(prompts, completions, columns)
        values = self.fn(**kwargs)
        if inspect.isawaitable(values):
            values = run_awaitables([values])[0]
        return self.output(values, len(completions), sink)

    def call_kwargs(self, prompts, completions, columns: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """TRL's keyword set for one call: prompts / completions (message lists for conversational rows),
        the data columns, completion_ids, and trainer_state / log_metric / log_extra where the function takes
        them (by name or **kwargs). Returns the kwargs and the sink log_metric / log_extra write into."""
        columns = dict(columns)
        messages = columns.pop(PROMPT_MESSAGES, None)
        states = columns.pop(TRAINER_STATE, None)
        trajectories = columns.pop(TRAJECTORY, None)  # tool episodes: passed only where the function takes it
        prompts, completions = conversational(list(prompts), list(completions), messages, trajectories)
        sink: dict[str, Any] = {"metrics": {}, "extra": {}}

        def log_metric(name: str, value: float) -> None:
            sink["metrics"][str(name)] = float(value)

        def log_extra(column: str, values: list) -> None:
            sink["extra"][str(column)] = list(values)

        context = {"trainer_state": states[0] if states else None, "log_metric": log_metric, "log_extra": log_extra}
        if trajectories is not None:
            context[TRAJECTORY] = list(trajectories)
        accepts = self._accepted(context)
        self._check_arguments(columns, accepts)
        return {"prompts": prompts, "completions": completions, **columns,
                **{k: v for k, v in context.items() if k in accepts}}, sink

    def output(self, values, n: int, sink: dict[str, Any]) -> RewardOutput:
        values = list(values)
        if len(values) != n:
            raise ValueError(f"reward {self.name!r} returned {len(values)} scores for {n} completions")
        info: list[dict[str, Any]] = [{} for _ in range(n)]
        for column, col in sink["extra"].items():
            if len(col) != n:
                raise ValueError(f"reward {self.name!r}: log_extra({column!r}) got {len(col)} values for {n} samples")
            for i, v in enumerate(col):
                info[i][column] = v
        return RewardOutput(scores=[None if v is None else float(v) for v in values], info=info,
                            metrics=dict(sink["metrics"]))

    def _accepted(self, names: dict[str, Any]) -> set[str]:
        try:
            params = inspect.signature(self.fn).parameters
        except (TypeError, ValueError):
            return set()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return set(names)
        return {k for k in names if k in params}

    def required_columns(self) -> list[tuple[str, ...]]:
        """The function's parameters without a default, less what the trainer passes itself."""
        try:
            params = inspect.signature(self.fn).parameters.values()
        except (TypeError, ValueError):  # builtins / C callables: nothing to check
            return []
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return [(p.name,) for p in params if p.kind in kinds and p.default is inspect.Parameter.empty
                and p.name not in TRAINER_KEYWORDS]

    def _check_arguments(self, columns: dict[str, Any], context: set[str] = frozenset()) -> None:
        """A missing dataset column is the user's to fix: say which one, before calling."""
        try:
            signature = inspect.signature(self.fn)
        except (TypeError, ValueError):  # builtins / C callables: nothing to check
            return
        try:
            signature.bind(prompts=None, completions=None, **{k: None for k in (*columns, *context)})
        except TypeError as err:
            raise RewardInputError(f"reward {self.name!r} cannot be called with the data's columns "
                                   f"({', '.join(sorted(columns)) or 'none'}): {err}; add the column to the dataset "
                                   "or give the function a default / **kwargs") from None


def score_all(rewards: Sequence[RewardFunction], prompts, completions, **columns: Any) -> list[RewardOutput]:
    """Each reward's output, in order; `async def` TRL-style rewards are awaited together (asyncio.gather)."""
    outs: list[RewardOutput | None] = [None] * len(rewards)
    pending = []
    for k, reward in enumerate(rewards):
        if isinstance(reward, CallableReward) and reward.is_async:
            kwargs, sink = reward.call_kwargs(prompts, completions, columns)
            pending.append((k, reward.fn(**kwargs), sink))
        else:
            outs[k] = reward.score(prompts, completions, **columns)
    if pending:
        results = run_awaitables([coro for _, coro, _ in pending])
        for (k, _, sink), values in zip(pending, results):
            outs[k] = rewards[k].output(values, len(completions), sink)
    return outs  # type: ignore[return-value]


def as_reward_function(obj: Any, name: str | None = None) -> RewardFunction:
    if isinstance(obj, RewardFunction):
        return obj
    if callable(obj):
        return CallableReward(obj, name=name)
    raise TypeError(f"a reward must be a RewardFunction or a callable fn(prompts, completions, **kwargs); got {type(obj).__name__}")


def completion_text(completion: Any, strict: bool = False) -> str:
    """Plain text of a completion: a string as is; conversational completions (a list of messages, or one
    message dict) give the last message's content. Anything else is `str(...)` ("" for None), or a TypeError
    when `strict` (the TRL / verl adapters, whose callers must pass text or messages)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if strict:
        raise TypeError(f"a completion must be a string or a list of chat messages, got {type(completion).__name__}")
    return "" if completion is None else str(completion)

