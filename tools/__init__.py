"""Tools for tool-augmented rewards (Themis): calculator, code_run (sandboxed), calendar, weather, translate,
web and wiki search, the Themis trace format, and a concurrent executor.

    from align import tools
    obs = tools.get_tool("Calendar.week_day")("2015-03-24")          # ToolResult(ok=True, output="Tuesday")
    res = tools.run_code("def f(): return 1", ["assert f() == 1"])   # ExecResult(status="ok", passed=1, ...)
    calls = tools.parse_trace(text).calls                             # [ToolCall(action, action_input, ...)]

`align.tools` imports nothing of align but `align.errors`.
"""
if __name__ != "align.tools":  # imported as bare `tools` from a checkout: see align/_bare_names.py
    from align._bare_names import hand_over

    hand_over(__name__, __file__)
else:
    from align.tools.base import FunctionTool, Tool, ToolError, ToolResult
    from align.tools.calc_eval import CalcError, CalcLimits
    from align.tools.calculator import Calculator, calculate
    from align.tools.calendar_tools import DayDifference, TargetDay, WeekDay, day_difference, target_day, week_day
    from align.tools.catalog import TOOLS, call_tool, get_tool, register_tool
    from align.tools.code_run import CodeRun, format_pass_rate
    from align.tools.executor import Call, ResultCache, ToolExecutor
    from align.tools.http_client import HTTPConfig
    from align.tools.registry import Registry, UnknownNameError
    from align.tools.sandbox import (
                          ExecResult,
                          Sandbox,
                          SandboxConfig,
                          SandboxUnavailableError,
                          TestOutcome,
                          detect_isolation,
                          get_sandbox,
                          run_code,
    )
    from align.tools.search import GoogleSerper, LocalSearch, WikiSearch
    from align.tools.trace import (
                          ParsedTrace,
                          ToolCall,
                          calls_from_tara,
                          is_finished,
                          parse_action,
                          parse_trace,
                          render_call,
                          render_observation,
                          render_trace,
    )
    from align.tools.translate import Translate
    from align.tools.weather import HistoryWeather

    __all__ = [
        "Tool", "ToolError", "ToolResult", "FunctionTool", "TOOLS", "get_tool", "register_tool", "call_tool",
        "Registry", "UnknownNameError", "ToolExecutor", "Call", "ResultCache",
        "Calculator", "calculate", "CalcError", "CalcLimits",
        "CodeRun", "format_pass_rate", "run_code", "ExecResult", "TestOutcome", "Sandbox", "SandboxConfig",
        "SandboxUnavailableError", "detect_isolation", "get_sandbox",
        "WeekDay", "DayDifference", "TargetDay", "week_day", "day_difference", "target_day",
        "HistoryWeather", "Translate", "GoogleSerper", "WikiSearch", "LocalSearch", "HTTPConfig",
        "ToolCall", "ParsedTrace", "render_trace", "render_call", "render_observation", "parse_trace", "parse_action",
        "is_finished", "calls_from_tara",
    ]
