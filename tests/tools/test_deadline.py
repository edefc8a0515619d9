"""DeadlineTools: a tool getter whose calls are bounded by timeout_s (a hanging tool answers ok=False in time)."""
from __future__ import annotations

import pickle
import threading
import time

import pytest

from align.tools import DeadlineTools, ToolResult


def test_registry_tools_answer_through_the_deadline():
    res = DeadlineTools(5.0)("Calendar.week_day")("2015-03-24")
    assert (res.ok, res.output) == (True, "Tuesday")  # 2015-03-24 was a Tuesday


def test_a_hanging_tool_times_out_and_its_thread_is_left_behind():
    release = threading.Event()

    def hang(tool_input, context=None):
        release.wait(30)
        return ToolResult(True, "late")

    t0 = time.monotonic()
    res = DeadlineTools(0.2, {"hang": hang})("hang")("x", context={"a": 1})
    took = time.monotonic() - t0
    release.set()
    assert (res.ok, res.error) == (False, "timeout after 0.2s")
    assert 0.2 <= res.latency_s and took < 5


def test_unknown_names_raise_key_error_and_crashes_propagate():
    tools = DeadlineTools(1.0, {"boom": lambda i, context=None: 1 / 0})
    with pytest.raises(KeyError):
        tools("nope")
    with pytest.raises(KeyError):
        DeadlineTools(1.0)("Not.a_tool")
    with pytest.raises(ZeroDivisionError):
        tools("boom")("x")
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        DeadlineTools(0)


def test_pickles_with_its_settings():
    clone = pickle.loads(pickle.dumps(DeadlineTools(3.0)))
    assert clone.timeout_s == 3.0 and clone("calendar.target_day")("2023-06-01, 12").output == "2023-06-13"
