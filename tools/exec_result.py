"""The result of one sandboxed run (`ExecResult`, one `TestOutcome` per test) and how the zygote's response
becomes one. Outside-graded tests pass only through `align.tools.grading.grade` on the value that came back."""
from __future__ import annotations

import signal
from dataclasses import dataclass, field

from align.tools.grading import IN_SANDBOX, OUTSIDE, TestPlan, grade


@dataclass
class TestOutcome:
    """grading: "outside" (the value came back as plain data and was compared here) or "in_sandbox" (the test
    statement ran in the program's interpreter: fakeable by a hostile program); see `align.tools.grading`.
    value: the plain-data text of the tested expression's value (outside grading; first 200 characters)."""

    ok: bool
    error: str | None = None
    grading: str = IN_SANDBOX
    value: str | None = None


@dataclass
class ExecResult:
    """status: "ok" (ran; every test passed, or no tests and exit 0), "failed" (some test failed),
    "error" (the program raised / exited non-zero), "timeout", "crashed" (killed by a signal: segfault,
    CPU limit, memory kill), "sandbox_error" (infrastructure: never a verdict on the program)."""

    status: str
    stdout: str = ""
    stderr: str = ""
    passed: int = 0
    failed: int = 0
    isolation: str = "none"
    tests: list[TestOutcome] = field(default_factory=list)
    program_error: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    duration_s: float = 0.0
    stdout_truncated: bool = False
    error: str | None = None  # infrastructure error text when status == "sandbox_error"

    @property
    def grading(self) -> str:
        """"outside" when every test was graded outside the sandbox, "in_sandbox" when every one ran inside it,
        "mixed" for both, "none" without tests."""
        modes = {t.grading for t in self.tests}
        return "none" if not modes else modes.pop() if len(modes) == 1 else "mixed"

    @property
    def in_sandbox_tests(self) -> int:
        """How many tests ran in the weaker in_sandbox mode."""
        return sum(t.grading != OUTSIDE for t in self.tests)

    @property
    def pass_rate(self) -> float:
        total = self.passed + self.failed
        return self.passed / total if total else 0.0

    @property
    def failure_reasons(self) -> list[str]:
        """Distinct non-empty failure messages in test order (assertion failures have none)."""
        seen: list[str] = []
        for t in self.tests:
            if not t.ok and t.error and t.error not in seen:
                seen.append(t.error)
        return seen


def _outcome(p: TestPlan, got: TestOutcome | None, value: str | None) -> TestOutcome | None:
    """An outside-graded test passes only through `grade` on a value: a "passed" line cannot pass it."""
    if p.mode != OUTSIDE:
        return got
    if value is not None:
        ok, why = grade(p, value)
        return TestOutcome(ok, why, OUTSIDE, value[:200])
    if got is not None and not got.ok:
        return TestOutcome(False, got.error, OUTSIDE)
    return None


def to_result(resp: dict, plans: list[TestPlan], isolation: str) -> ExecResult:
    tests = [p.source for p in plans]
    if "infra_error" in resp:
        return ExecResult("sandbox_error", isolation=isolation, failed=len(tests), error=resp["infra_error"])
    got = {int(i): TestOutcome(bool(ok), why) for i, ok, why in resp.get("tests", [])}
    values = {int(i): text for i, text in resp.get("values", [])}
    sig, code = resp.get("signal"), resp.get("exit_code")
    # RLIMIT_CPU (set to the run's timeout) is a time limit too: a busy program can reach it a moment before the
    # wall-clock deadline, and which of the two fires first must not change the verdict.
    timed_out = bool(resp["timed_out"]) or sig == signal.SIGXCPU
    outcomes = []
    for i, p in enumerate(plans):
        outcome = _outcome(p, got.get(i), values.get(i))
        if outcome is not None:
            outcomes.append(outcome)
        elif timed_out:
            outcomes.append(TestOutcome(False, "timed out", p.mode))
        else:
            outcomes.append(TestOutcome(False, resp.get("program_error") or "test did not run (the program exited)",
                                        p.mode))
    passed = sum(t.ok for t in outcomes)
    if timed_out:
        status = "timeout"
    elif sig is not None:
        status = "crashed"
    elif code == 70 and "sandbox setup failed" in resp.get("stderr", ""):
        status = "sandbox_error"
    elif tests:
        status = "ok" if passed == len(tests) and resp.get("finished") else "failed"
    else:
        status = "ok" if code == 0 else "error"
    return ExecResult(status=status, stdout=resp.get("stdout", ""), stderr=resp.get("stderr", ""), passed=passed,
                      failed=len(tests) - passed, isolation=isolation, tests=outcomes,
                      program_error=resp.get("program_error"), exit_code=code, signal=sig,
                      duration_s=float(resp.get("duration_s", 0.0)),
                      stdout_truncated=bool(resp.get("stdout_truncated")),
                      error=resp.get("stderr") if status == "sandbox_error" else None)


__all__ = ["ExecResult", "TestOutcome", "to_result"]
