"""The Environment protocol a tool episode runs against, and the bounded pool that runs its calls.

    class Environment(Protocol):
        def tool_schemas(self) -> list[dict]: ...        # JSON schemas for the chat template's `tools=`
        def reset(self, sample: dict) -> Any: ...         # one episode's state, from the row's dataset columns
        def step(self, state, call: ParsedCall, messages: list[dict]) -> str: ...  # one call -> observation

`step` sees the conversation so far (TRL-style messages of the response). It may raise: the driver turns
any exception, a timeout or a malformed call into an observation that says so. The built-in environment over
align.tools (calculator, sandboxed code, ...) is `align.tool_env.ToolEnvironment` (align.rollouts may not
import align.tools).
"""
from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Protocol, runtime_checkable

from align.rollouts.tool_formats import ParsedCall


@runtime_checkable
class Environment(Protocol):
    def tool_schemas(self) -> list[dict]: ...

    def reset(self, sample: dict) -> Any: ...

    def step(self, state: Any, call: ParsedCall, messages: list[dict]) -> str: ...


class CallRunner:
    """Runs (environment, state, call, messages) jobs on a bounded thread pool; each call gets `timeout_s`
    from when it starts. A call that overruns is reported as a timeout and its thread is left to finish in
    the background (Python threads cannot be killed; align.tools' code and arithmetic tools run in killable
    child processes with their own deadlines). The whole batch is bounded too, so a pool filled by hung
    calls can never hang the rollout: a call still queued after that bound is reported as not started."""

    def __init__(self, max_workers: int = 16, timeout_s: float = 30.0, max_output_chars: int = 1 << 20):
        if max_workers < 1 or not timeout_s > 0:
            raise ValueError("tool calls need max_workers >= 1 and timeout_s > 0")
        self.timeout_s, self.max_workers, self.max_output_chars = timeout_s, max_workers, max_output_chars
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="episode-tool")

    def _one(self, env: Environment, state: Any, call: ParsedCall, messages: list[dict], started: list) -> str:
        started.append(time.monotonic())
        out = env.step(state, call, messages)
        if not isinstance(out, str):
            raise TypeError(f"Environment.step must return a string, got {type(out).__name__}")
        return out

    def run(self, jobs: list[tuple[Environment, Any, ParsedCall, list[dict]]]) -> list[str]:
        """One observation text per job, in order; never raises for a failing call."""
        results: list[str | None] = [None] * len(jobs)
        pending: dict[Future, tuple[int, list]] = {}
        for i, (env, state, call, messages) in enumerate(jobs):
            if call.error is not None:
                results[i] = f"Error: {call.error}; the call was not run."
                continue
            started: list = []
            pending[self._pool.submit(self._one, env, state, call, messages, started)] = (i, started)
        rounds = -(-len(pending) // self.max_workers) + 1
        deadline = time.monotonic() + self.timeout_s * rounds
        while pending:
            done, _ = wait(list(pending), timeout=0.02, return_when=FIRST_COMPLETED)
            for fut in done:
                i, _ = pending.pop(fut)
                try:
                    results[i] = fut.result()
                except Exception as exc:  # a tool bug is the policy's observation, not a crashed rollout
                    results[i] = f"Error: the tool {jobs[i][2].name!r} failed: {type(exc).__name__}: {exc}"
            now = time.monotonic()
            for fut, (i, started) in list(pending.items()):
                if (started and now - started[0] > self.timeout_s) or now > deadline:
                    pending.pop(fut)
                    fut.cancel()
                    what = "timed out" if started else "was not started (the tool pool is busy)"
                    results[i] = f"Error: the tool {jobs[i][2].name!r} {what} after {self.timeout_s:g}s."
        return [r if len(r) <= self.max_output_chars else
                r[:self.max_output_chars] + f"\n[tool output cut at {self.max_output_chars} of {len(r)} characters]"
                for r in results]  # type: ignore[union-attr]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
