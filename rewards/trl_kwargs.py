"""TRL's reward-calling convention, on both sides of the trainer.

What a TRL-style reward `fn(prompts, completions, **kwargs)` receives (mirroring trl 0.2x-1.x GRPOTrainer's
`_calculate_rewards`): `prompts` / `completions` (message lists when the prompts are conversations, the
completion being `[{"role": "assistant", "content": text}]`), `completion_ids`, every dataset column,
`trainer_state` (an object with TRL TrainerState's `global_step`, `epoch`, `max_steps`, ...), `log_metric(name,
value)` and `log_extra(column, values)`. `async def` rewards are awaited (several gathered concurrently).

Tool episodes (a batch with the `trajectory` column): as trl 1.x's tool-calling GRPOTrainer, a conversational
row's completion is the whole message list of the response (assistant turns with `tool_calls`, `tool` turns with
the observations); a function that names `trajectory` (or takes **kwargs) also gets that list for every row,
text prompts included.

The trainer carries the per-call context as two columns of the batch (so it crosses processes with the rest of
the batch): CONTEXT_COLUMNS below; only TRL-style callables are handed them, other rewards never send them.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
from dataclasses import dataclass
from typing import Any, Awaitable, Sequence

PROMPT_MESSAGES = "prompt_messages"  # [N] the original message list of a conversational prompt, else None
TRAINER_STATE = "trainer_state"  # [N] the same RewardTrainerState (a list, so sharding a batch keeps it)
# [N] per sample the response as TRL-style messages (tool episodes; set by the rollout engine): [{"role":
# "assistant", "content": str, "tool_calls": [{"type": "function", "function": {"name", "arguments"}}]},
# {"role": "tool", "name": str, "content": str}, ...]
TRAJECTORY = "trajectory"
CONTEXT_COLUMNS = (PROMPT_MESSAGES, TRAINER_STATE)
# What TRL's GRPOTrainer passes besides the data: never data columns, never forwarded to a service.
TRL_CALL_KEYS = ("trainer_state", "log_extra", "log_metric", "environments")


@dataclass
class RewardTrainerState:
    """The TrainerState fields a reward shapes itself by (same names and meaning as transformers' TrainerState):
    global_step = optimizer steps done before this batch; epoch = the fractional epochs those steps make."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0
    num_train_epochs: int = 0
    is_world_process_zero: bool = True
    is_local_process_zero: bool = True


def conversational(prompts: Sequence[Any], completions: Sequence[Any], messages: Sequence[Any] | None,
                   trajectories: Sequence[Any] | None = None) -> tuple[list[Any], list[Any]]:
    """TRL's shapes: where a row's prompt was a message list, the prompt is that list and the completion is
    `[{"role": "assistant", "content": text}]`, or the row's trajectory (its response's messages, tool turns
    included) when it has one; other rows stay text."""
    if not messages:
        return list(prompts), list(completions)
    trajectories = trajectories or [None] * len(prompts)
    ps, cs = [], []
    for p, c, m, traj in zip(prompts, completions, messages, trajectories):
        conv = isinstance(m, list)
        ps.append(m if conv else p)
        if conv and isinstance(traj, list) and traj:
            cs.append(list(traj))
        else:
            cs.append([{"role": "assistant", "content": c}] if conv and isinstance(c, str) else c)
    return ps, cs


def prompt_text(prompt: Any) -> str:
    """A prompt as text for rewards that take strings: a conversation gives its contents joined by newlines."""
    if isinstance(prompt, list):
        return "\n".join(str(m.get("content", "")) for m in prompt if isinstance(m, dict))
    return "" if prompt is None else str(prompt)


def is_async_callable(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def run_awaitables(items: Sequence[Awaitable[Any]]) -> list[Any]:
    """Await all of `items` concurrently (asyncio.gather) and return their results in order. Inside a running
    event loop (a notebook, an async server) they run on a fresh loop in a worker thread: never a deadlock."""
    async def gather() -> list[Any]:
        return list(await asyncio.gather(*items))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(gather())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, gather()).result()


__all__ = ["CONTEXT_COLUMNS", "PROMPT_MESSAGES", "RewardTrainerState", "TRAINER_STATE", "TRAJECTORY", "TRL_CALL_KEYS",
           "conversational", "is_async_callable", "prompt_text", "run_awaitables"]
