"""Themis's `code_run`: run the judged answer against the sample's `test_list` in the sandbox and report
"The pass rate is {p}. ..." (per-test grading, never the exit code)."""
from __future__ import annotations

from align.tools.base import Tool, ToolError
from align.tools.sandbox import ExecResult
from align.tools.tier_policy import require_tier, required_sandbox

SAME_AS_ANSWER = "same as the answer"


def format_pass_rate(res: ExecResult) -> str:
    """Themis's observation text for one graded run."""
    total = res.passed + res.failed
    rate = res.passed / total
    if res.failed == 0:
        text = f"The pass rate is {rate}. All test cases passed."
    elif res.passed == 0:
        text = f"The pass rate is {rate}. All test cases failed."
    else:
        text = f"The pass rate is {rate}. {res.passed} test cases passed, and {res.failed} test cases failed."
    reasons = res.failure_reasons
    return text + (f" Failed reason: {'; '.join(reasons)}" if reasons else "")


class CodeRun(Tool):
    """input: the program, or "Same as the answer" (then `context["answer"]`); tests: `context["test_list"]`
    (after optional `context["test_setup_code"]`). Sandbox failures are errors, never a 0.0 pass rate."""

    name = "code_run"
    description = "Run Python code against the sample's test cases and report the pass rate."

    def __init__(self, timeout_s: float = 10.0, per_test_timeout_s: float = 3.0, memory_mb: int | None = None,
                 isolation: str | None = None):
        """isolation: None pins the strongest tier the machine starts at first use (never rlimits); a weaker
        tier only by name. The pinned tier never degrades (see align.tools.tier_policy)."""
        self.timeout_s, self.per_test_timeout_s, self.memory_mb = timeout_s, per_test_timeout_s, memory_mb
        self.isolation = isolation
        self._tier: str | None = None  # resolved lazily: the tool catalog builds a CodeRun at import time

    def run(self, input: str, context: dict) -> str:
        code = input
        if input.strip().strip(".").lower() == SAME_AS_ANSWER or not input.strip():
            code = context.get("answer")
            if not isinstance(code, str):
                raise ToolError("code_run input is 'Same as the answer' but the context has no 'answer'")
        tests = context.get("test_list")
        if not tests or not isinstance(tests, (list, tuple)):
            raise ToolError("code_run needs the sample's 'test_list' in the context")
        setup = context.get("test_setup_code") or ""
        program = f"{setup}\n{code}" if setup else code
        if self._tier is None:
            self._tier = require_tier(self.isolation, who="code_run")
        res = required_sandbox(self._tier).run(program, [str(t) for t in tests], timeout_s=self.timeout_s,
                                memory_mb=self.memory_mb, per_test_timeout_s=self.per_test_timeout_s)
        if res.status == "sandbox_error":
            raise ToolError(f"sandbox failure: {res.error}")
        return format_pass_rate(res)


__all__ = ["CodeRun", "format_pass_rate"]
