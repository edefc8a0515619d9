"""Per-call deadlines for a reward's tool calls: `DeadlineTools(timeout_s)` is a tool getter (name -> tool) whose
tools answer ToolResult(ok=False, error="timeout after Xs") when a call runs past `timeout_s`.

The Themis trace loop calls `tool(input, context=...)` directly and waits for every call of a round, so one tool
that never returns (a weather backend that stopped answering, a search call on a dead socket) would hang the
reward worker and every request behind it. Here each call runs in a daemon thread the caller waits on for at
most `timeout_s`; a call that overruns is abandoned (Python cannot kill a thread; daemon threads do not block
exit) and its answer is an explicit failure, which the trace shows as the failure observation.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Mapping

from align.tools.base import ToolResult


class _TimedTool:
    def __init__(self, tool: Callable[..., ToolResult], name: str, timeout_s: float):
        self.tool, self.name, self.timeout_s = tool, name, timeout_s

    def __call__(self, input: str, context: dict | None = None) -> ToolResult:
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["result"] = self.tool(input, context=context)
            except BaseException as err:  # noqa: BLE001 - handed back to the caller below
                box["error"] = err

        t0 = time.perf_counter()
        thread = threading.Thread(target=run, name=f"tool-{self.name}"[:60], daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        if thread.is_alive():
            return ToolResult(False, "", f"timeout after {self.timeout_s:g}s", time.perf_counter() - t0)
        if "error" in box:  # a tool that raises is a crash, not an answer: the caller decides (Themis re-raises)
            raise box["error"]
        return box["result"]


class DeadlineTools:
    """name -> tool, each call bounded by `timeout_s`. tools: None (the tools package's registry), a
    {name: tool} mapping or a callable name -> tool; an unknown name raises KeyError as the registry does.
    Holds only its settings, so it pickles (to Ray reward workers)."""

    def __init__(self, timeout_s: float = 30.0, tools: Mapping[str, Callable] | Callable[[str], Callable] | None = None):
        if not timeout_s > 0:
            raise ValueError(f"tool timeout_s must be > 0, got {timeout_s}")
        self.timeout_s, self.tools = float(timeout_s), tools

    def _resolve(self, name: str) -> Callable[..., ToolResult]:
        if self.tools is None:
            from align.tools.catalog import get_tool

            return get_tool(name)
        if isinstance(self.tools, Mapping):
            if name not in self.tools:
                raise KeyError(name)
            return self.tools[name]
        return self.tools(name)

    def __call__(self, name: str) -> _TimedTool:
        return _TimedTool(self._resolve(name), name, self.timeout_s)


__all__ = ["DeadlineTools"]
