"""Themis's Calendar tools: week_day('YYYY-MM-DD'), day_difference('D1, D2'), target_day('D, N')."""
from __future__ import annotations

import calendar
import re
from datetime import date, timedelta

from align.tools.base import Tool, ToolError

_DATE = re.compile(r"\s*(\d{4})-(\d{1,2})-(\d{1,2})\s*")


def _parse_date(text: str) -> date:
    m = _DATE.fullmatch(text.strip().strip("'\""))
    if not m:
        raise ToolError(f"expected a date like 2023-06-01, got {text.strip()[:40]!r}")
    try:
        return date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError as exc:
        raise ToolError(f"invalid date {text.strip()!r}: {exc}") from None


def _split(text: str, n: int, usage: str) -> list[str]:
    parts = [p for p in re.split(r"\s*,\s*", text.strip()) if p != ""]
    if len(parts) != n:
        raise ToolError(f"expected {usage}, got {text.strip()[:60]!r}")
    return parts


def week_day(input: str) -> str:
    """'2015-03-24' -> 'Tuesday'."""
    return calendar.day_name[_parse_date(input).weekday()]


def day_difference(input: str) -> str:
    """'2020-06-10, 2000-01-10' -> '7457' (absolute days)."""
    a, b = _split(input, 2, "two dates like '2020-06-10, 2000-01-10'")
    return str(abs((_parse_date(a) - _parse_date(b)).days))


def target_day(input: str) -> str:
    """'2023-06-01, 12' -> '2023-06-13' (N may be negative)."""
    d, n = _split(input, 2, "a date and a day count like '2023-06-01, 12'")
    try:
        days = int(n.strip().lstrip("+"))
    except ValueError:
        raise ToolError(f"day count must be an integer, got {n!r}") from None
    if abs(days) > 3_000_000:
        raise ToolError("day count too large")
    try:
        return (_parse_date(d) + timedelta(days=days)).strftime("%Y-%m-%d")
    except OverflowError:
        raise ToolError("resulting date is out of range") from None


class WeekDay(Tool):
    name = "Calendar.week_day"
    description = "Weekday name of a date 'YYYY-MM-DD'."

    def run(self, input: str, context: dict) -> str:
        return week_day(input)


class DayDifference(Tool):
    name = "Calendar.day_difference"
    description = "Absolute number of days between 'YYYY-MM-DD, YYYY-MM-DD'."

    def run(self, input: str, context: dict) -> str:
        return day_difference(input)


class TargetDay(Tool):
    name = "Calendar.target_day"
    description = "The date N days after 'YYYY-MM-DD, N'."

    def run(self, input: str, context: dict) -> str:
        return target_day(input)


__all__ = ["week_day", "day_difference", "target_day", "WeekDay", "DayDifference", "TargetDay"]
