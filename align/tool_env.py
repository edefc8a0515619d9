"""The built-in tool-episode environment: align.tools (calculator, sandboxed code, calendar, search, ...) as an
`align.rollouts.environment.Environment` (docs/tool_use.md).

Every tool takes one string: its call's arguments must be exactly {"input": string} (the schemas say so);
anything else is an observation naming the expected arguments. "python" runs the program in the sandbox at
the strongest isolation tier this machine starts (never weaker silently) and shows its status, stdout and
stderr; the other names resolve through align.tools' registry (aliases included).
"""
from __future__ import annotations

from typing import Any

from align.rollouts.tool_formats import ParsedCall
from align.tools import Tool, ToolError, get_tool
from align.tools.tier_policy import require_tier, required_sandbox
from align.tools.trace import ACTION_RE


class PythonExec(Tool):
    """Run a policy-written program in the sandbox; the observation is its status and output."""

    name = "python"
    description = "Run a Python program in a sandbox and show its exit status, stdout and stderr."

    def __init__(self, timeout_s: float = 10.0, memory_mb: int | None = None, isolation: str | None = None):
        self.timeout_s, self.memory_mb, self.isolation = timeout_s, memory_mb, isolation
        self._tier: str | None = None

    def run(self, input: str, context: dict) -> str:
        if self._tier is None:
            self._tier = require_tier(self.isolation, who="the python tool")
        res = required_sandbox(self._tier).run(input, None, timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        if res.status == "sandbox_error":
            raise ToolError(f"sandbox failure: {res.error}")
        return f"status: {res.status}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"


def _schema(name: str, description: str) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}}}


class ToolEnvironment:
    """Tools by name (`rollout.tools: [calculator, python]`) or Tool instances; the row's dataset columns are
    each call's context (code_run reads `test_list` there)."""

    def __init__(self, tools: list[str | Tool]):
        self.tools: dict[str, Tool] = {}
        for t in tools:
            tool = t if isinstance(t, Tool) else (PythonExec() if t == "python" else get_tool(t))
            self.tools[t if isinstance(t, str) else tool.name] = tool

    def tool_schemas(self) -> list[dict]:
        return [_schema(name, t.description) for name, t in self.tools.items()]

    def reset(self, sample: dict) -> Any:
        return dict(sample)

    def step(self, state: Any, call: ParsedCall, messages: list[dict]) -> str:
        tool = self.tools.get(call.name)
        if tool is None:
            return f"Error: unknown tool {call.name!r}; the tools are {', '.join(self.tools)}."
        if set(call.arguments) != {"input"} or not isinstance(call.arguments["input"], str):
            return f'Error: {call.name} takes arguments {{"input": string}}, got {sorted(call.arguments)}.'
        return tool(call.arguments["input"], state).observation()


class EpisodeDriver:
    """What the trainer's generate phase calls instead of `engine.generate` when tool episodes are on."""

    def __init__(self, fmt, env, limits, runner):
        self.fmt, self.env, self.limits, self.runner = fmt, env, limits, runner

    def __call__(self, engine, prompts, params, sample_ids=None, columns=None):
        from align.rollouts.episodes import generate_episodes

        return generate_episodes(engine, prompts, params, self.fmt, self.env, self.limits, runner=self.runner,
                                 sample_ids=sample_ids, columns=columns)

    def close(self) -> None:
        self.runner.close()


def make_episodes(rollout, tokenizer) -> EpisodeDriver | None:
    """The driver for config section `rollout` (RolloutConfig), or None when no tools / environment is set."""
    import importlib

    from align.errors import ConfigError
    from align.rollouts.environment import CallRunner
    from align.rollouts.episodes import EpisodeLimits
    from align.rollouts.tool_formats import TINY_TOOL_CHAT_TEMPLATE, get_format

    if not (rollout.tools or rollout.environment):
        return None
    if rollout.environment:
        module, _, cls = rollout.environment.partition(":")
        try:
            env = getattr(importlib.import_module(module), cls)()
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"rollout.environment = {rollout.environment!r} cannot be loaded ({exc}); give an "
                              f"importable 'module:Class'") from None
    else:
        env = ToolEnvironment(list(rollout.tools))
    template = TINY_TOOL_CHAT_TEMPLATE if rollout.tool_chat_template == "tiny" else (rollout.tool_chat_template or None)
    try:
        options = {"action_re": ACTION_RE} if rollout.tool_format == "themis" else {}
        fmt = get_format(rollout.tool_format, tokenizer, template, **options)
    except ValueError as exc:
        raise ConfigError(f"rollout.tool_format: {exc}") from None
    limits = EpisodeLimits(rollout.max_turns, rollout.max_tool_calls, rollout.max_observation_tokens)
    return EpisodeDriver(fmt, env, limits, CallRunner(rollout.tool_workers, rollout.tool_timeout_s))


def episodes_factory(rollout):
    """What a Ray rollout worker builds its own driver with (`RolloutWorker(episodes=...)`): a picklable
    `tokenizer -> EpisodeDriver` for config section `rollout`, or None when no tools / environment is set."""
    import functools

    if not (rollout.tools or rollout.environment):
        return None
    return functools.partial(make_episodes, rollout)
