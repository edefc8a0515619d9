"""The tool registry: Themis's exact action names plus plain aliases; plug-ins via the `align.tools` entry points."""
from __future__ import annotations

from align.tools.base import FunctionTool, Tool, ToolResult
from align.tools.registry import Registry

TOOLS: Registry = Registry("tool", entry_point_group="align.tools")


def register_tool(name: str, tool=None, *, aliases: tuple[str, ...] = (), overwrite: bool = False):
    """Register a Tool instance or a plain `fn(input, context) -> str` (wrapped). Usable as a decorator."""

    def _add(obj):
        wrapped = obj if isinstance(obj, Tool) else FunctionTool(name, obj)
        TOOLS.register(name, wrapped, aliases=aliases, overwrite=overwrite)
        return obj

    return _add if tool is None else _add(tool)


def get_tool(name: str) -> Tool:
    """The tool for a Themis action name ('calculator', 'Calendar.week_day', ...) or an alias; raises
    UnknownNameError (a KeyError) naming the close matches."""
    return TOOLS.get(name.strip() if isinstance(name, str) else name)


def call_tool(name: str, input: str, context: dict | None = None) -> ToolResult:
    """get_tool + call; an unknown name becomes ToolResult(ok=False) instead of an exception."""
    try:
        tool = get_tool(name)
    except KeyError as exc:
        return ToolResult(False, "", str(exc), 0.0)
    return tool(input, context)


def _register_builtins() -> None:
    from align.tools.answer_check import AnswerMentions
    from align.tools.calculator import Calculator
    from align.tools.calendar_tools import DayDifference, TargetDay, WeekDay
    from align.tools.code_run import CodeRun
    from align.tools.search import GoogleSerper, WikiSearch
    from align.tools.translate import Translate
    from align.tools.weather import HistoryWeather

    register_tool("calculator", Calculator(), aliases=("calc", "Calculator"))
    register_tool("code_run", CodeRun(), aliases=("python", "code_interpreter", "run_code"))
    register_tool("Calendar.week_day", WeekDay(), aliases=("week_day", "calendar.week_day"))
    register_tool("Calendar.day_difference", DayDifference(), aliases=("day_difference", "calendar.day_difference"))
    register_tool("Calendar.target_day", TargetDay(), aliases=("target_day", "calendar.target_day"))
    register_tool("history_weather", HistoryWeather(), aliases=("weather",))
    register_tool("Answer.mentions", AnswerMentions(), aliases=("answer_mentions", "answer.mentions"))
    register_tool("translate", Translate(), aliases=("translator",))
    register_tool("google_serper", GoogleSerper(), aliases=("web_search", "serper", "google_search"))
    register_tool("wiki_search", WikiSearch(), aliases=("wikipedia", "wikisearch", "WikiSearch"))


_register_builtins()

__all__ = ["TOOLS", "register_tool", "get_tool", "call_tool"]
