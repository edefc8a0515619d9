"""`CodeTests`: the fraction of a sample's tests the completion's code passes in the sandbox (`align.tools.run_code`)."""
from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from align.rewards.base import RewardFunction, RewardOutput
from align.rewards.verifiers.common import _column, _completion_text
from align.tools.grading import IN_SANDBOX, plan

_CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> str | None:
    """The last fenced code block (```python ... ```), or None when the completion has none."""
    blocks = _CODE_BLOCK.findall(text or "")
    return blocks[-1] if blocks else None


# ExecResult.status values that mean "the program ran (or was stopped for its own behaviour)": grade it.
# Anything else (a sandbox that could not start, a missing isolation tier) is an infrastructure failure.
# (tools.run_code: ok / failed / error / timeout / crashed are verdicts on the program; sandbox_error is not.)
PROGRAM_STATUSES = {"ok", "failed", "error", "timeout", "crashed"}


_SANDBOX_POOL: ThreadPoolExecutor | None = None
_SANDBOX_POOL_LOCK = threading.Lock()


def _sandbox_pool() -> ThreadPoolExecutor:
    """One process-wide pool of long-lived threads that make every sandbox call. Sandbox workers can be tied
    to the life of the thread that started them (a parent-death signal fires when the spawning *thread*
    exits), so calls from short-lived threads would leave dead workers behind."""
    global _SANDBOX_POOL
    with _SANDBOX_POOL_LOCK:
        if _SANDBOX_POOL is None:
            _SANDBOX_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="code-tests")
        return _SANDBOX_POOL


class CodeTests(RewardFunction):
    """Fraction of the `tests` column's tests that the completion's code passes (or 1.0 / 0.0 when
    `partial_credit=False`), run through `align.tools.run_code` in the sandbox.

    The code is the last fenced block (or the whole completion when `require_block=False`). A completion
    with no code scores 0.0 ({"reason": "no code"}); a program that times out or crashes is a wrong answer
    (0.0); a sandbox failure is an error for the sample. Tests: a list of assert statements, or a string.

    strict (default True): every test must be gradable "outside" the sandbox (`assert f(...) == <literal>`
    and the other forms in `align.tools.grading`), where a hostile program cannot fake a pass. A sample
    with any other test is an error for that sample (score None, naming the test), never run: the policy
    is optimised against this reward, so a fakeable test would be learned as a reward hack. strict=False
    runs such tests in the weaker "in_sandbox" mode and reports how many did (`info["in_sandbox_tests"]`).
    """

    name = "code_tests"

    def __init__(self, timeout_s: float = 10.0, memory_mb: int = 512, partial_credit: bool = True,
                 require_block: bool = False, tests_column: str = "tests", max_workers: int = 2,
                 strict: bool = True, isolation: str | None = None):
        """isolation: None requires the strongest sandbox tier this machine starts now (refusing "rlimits");
        "unshare" / "rlimits" accept that weaker tier by name. The tier is pinned: if it stops starting later,
        scoring raises SandboxUnavailableError (the run fails) rather than grading weaker. Each sample's info
        names the tier ("isolation")."""
        from align.tools.tier_policy import require_tier

        if timeout_s <= 0:
            raise ValueError(f"code_tests: timeout_s must be > 0, got {timeout_s}")
        self.isolation = require_tier(isolation, who="code_tests")
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.partial_credit = partial_credit
        self.require_block = require_block
        self.tests_column = tests_column
        self.max_workers = max(1, int(max_workers))
        if not isinstance(strict, bool):
            raise ValueError(f"code_tests: strict must be true or false, got {strict!r}")
        self.strict = strict

    def verify(self, completion: str, tests: Any) -> tuple[float | None, str | None, dict[str, Any]]:
        from align.tools import run_code  # imported per call: align.tools loads lazily, and tests patch it

        if tests is None or (isinstance(tests, (list, tuple)) and not tests) or (isinstance(tests, str) and not tests.strip()):
            return None, "no tests for this sample", {}
        code = extract_code(completion)
        if code is None and not self.require_block:
            code = completion
        if code is None or not code.strip():
            return 0.0, None, {"reason": "no code"}
        from align.tools.sandbox import SandboxUnavailableError
        from align.tools.tier_policy import required_sandbox

        test_list = [tests] if isinstance(tests, str) else [str(t) for t in tests]
        if self.strict:
            for i, t in enumerate(test_list):
                p = plan(t)
                if p.mode == IN_SANDBOX:
                    return None, (f"code_tests strict=True refuses test {i} ({p.why}): {t.strip()[:80]!r}; write it "
                                  "as `assert f(...) == <literal>` or set strict=false to grade it in_sandbox"), {}
        try:
            result = run_code(code, tests=test_list, timeout_s=self.timeout_s, memory_mb=self.memory_mb,
                              sandbox=required_sandbox(self.isolation))
        except SandboxUnavailableError:
            raise  # the pinned tier is gone: fail the run, never grade at a weaker tier
        except Exception as err:  # noqa: BLE001 - the sandbox itself failed: infrastructure, not a wrong answer
            return None, f"sandbox failed: {type(err).__name__}: {err}"[:300], {}
        status = str(getattr(result, "status", "")).lower()
        passed, failed = int(getattr(result, "passed", 0) or 0), int(getattr(result, "failed", 0) or 0)
        info = {"status": status, "passed": passed, "failed": failed,
                "isolation": str(getattr(result, "isolation", "")),
                "grading": str(getattr(result, "grading", "")),
                "in_sandbox_tests": int(getattr(result, "in_sandbox_tests", 0) or 0)}
        if status not in PROGRAM_STATUSES:
            stderr = str(getattr(result, "stderr", ""))[-200:]
            return None, f"sandbox error (status {status!r}): {stderr}".strip(), info
        if status != "ok":
            info["reason"] = status
        total = passed + failed
        if total == 0:
            # the program never reached its tests (syntax error, crash, timeout): a wrong answer
            return 0.0, None, {**info, "reason": status or "no tests ran"}
        if self.partial_credit:
            return passed / total, None, info
        return (1.0 if failed == 0 and passed == total else 0.0), None, info

    def required_columns(self) -> list[tuple[str, ...]]:
        return [(self.tests_column, "test_list")]

    def score(self, prompts, completions, **columns) -> RewardOutput:
        tests = _column(columns, (self.tests_column, "test_list"), len(completions), self.name)
        texts = [_completion_text(c) for c in completions]
        pool = _sandbox_pool()
        results: list[Any] = []
        for start in range(0, len(texts), self.max_workers):
            chunk = slice(start, start + self.max_workers)
            results.extend(pool.map(self.verify, texts[chunk], tests[chunk]))
        return RewardOutput(scores=[r[0] for r in results], errors=[r[1] for r in results],
                            info=[r[2] for r in results])
