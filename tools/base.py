"""The tool protocol: `tool(input: str, context: dict | None = None) -> ToolResult`, never raising for bad input."""
from __future__ import annotations

import time
from dataclasses import dataclass

from align.errors import AlignError


@dataclass
class ToolResult:
    """ok: the tool ran and `output` is its answer; otherwise `error` says what failed (bad input, timeout,
    backend down). `latency_s` is the wall time of the call."""

    ok: bool
    output: str = ""
    error: str | None = None
    latency_s: float = 0.0

    def observation(self) -> str:
        """The text a Themis trace shows after 'Observation:' (a failed call says that the tool failed)."""
        return self.output if self.ok else f"The tool failed: {self.error}"


class ToolError(AlignError):
    """A failure the tool reports as ToolResult(ok=False, error=message)."""


class Tool:
    """Base class: subclasses implement `run(input, context) -> str` and may raise ToolError.

    Instances hold only plain configuration, so they pickle (to Ray workers or process pools); heavy
    resources (child processes, HTTP sessions, indexes) live in module-level caches created on first use.
    """

    name: str = "tool"
    description: str = ""

    def run(self, input: str, context: dict) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, input: str, context: dict | None = None) -> ToolResult:
        t0 = time.perf_counter()
        try:
            if not isinstance(input, str):
                raise ToolError(f"{self.name} input must be a string, got {type(input).__name__}")
            if context is not None and not isinstance(context, dict):
                raise ToolError(f"{self.name} context must be a dict or None, got {type(context).__name__}")
            out = self.run(input, context or {})
            return ToolResult(True, out, None, time.perf_counter() - t0)
        except ToolError as exc:
            return ToolResult(False, "", str(exc), time.perf_counter() - t0)
        except Exception as exc:  # a tool bug must not take the reward worker down
            return ToolResult(False, "", f"{type(exc).__name__}: {exc}", time.perf_counter() - t0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class FunctionTool(Tool):
    """Wrap a plain `fn(input, context) -> str` (module-level, so it pickles) as a Tool."""

    def __init__(self, name: str, fn, description: str = ""):
        self.name, self.fn, self.description = name, fn, description

    def run(self, input: str, context: dict) -> str:
        return str(self.fn(input, context))


__all__ = ["Tool", "ToolError", "ToolResult", "FunctionTool"]
