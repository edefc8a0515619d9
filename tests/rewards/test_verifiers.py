"""Verifiers against hand-written truth tables; timeouts and sandbox failures are errors, not zeros."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time

import pytest

from align.rewards.verifiers import (
    CodeTests,
    FormatReward,
    MathVerify,
    UnsafeExpression,
    extract_answer,
    extract_code,
    normalize_answer,
    parse_safe,
)


@pytest.fixture(scope="module")
def math_reward():
    reward = MathVerify(timeout_s=20)
    yield reward
    reward.close()


@pytest.mark.parametrize("text, expected", [
    (r"so the result is \boxed{\frac{1}{2}} indeed", r"\frac{1}{2}"),
    (r"\boxed{1} then \boxed{\sqrt{x^{2}}}", r"\sqrt{x^{2}}"),  # the last box, nested braces
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
    ("The answer is 3.5.", "3.5"),
    ("Final answer: x = 2\n", "x = 2"),
    (r"\boxed 7 done", "7"),
    ("I think it is 12 or 13", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extraction_stays_fast_on_adversarial_text():
    started = time.monotonic()
    assert extract_answer("\\boxed{" * 50_000) is None  # many unbalanced boxes: no O(n^2) scan
    assert extract_answer("x" * 1_000_000 + r"\boxed{5}") == "5"
    assert time.monotonic() - started < 2.0


def test_extract_last_number_only_when_asked():
    assert extract_answer("it is 12 or 13") is None
    assert extract_answer("it is 12 or 13", last_number=True) == "13"


@pytest.mark.parametrize("raw, expected", [
    (r"\frac{1}{2}", "((1)/(2))"), (r"\dfrac12", "((1)/(2))"), (r"\$1,000", "1000"), ("12 dollars", "12"),
    ("5cm", "5"), (r"4\text{ cm}^2", "4"), ("3 m/s", "3"), ("x = 5", "5"), (r"50\%", "50"), (r"90^\circ", "90"),
    ("2x", "2x"), ("2 pi", "2 pi"), ("(B)", "B"), (r"\left(1, 2\right)", "(1, 2)"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("text", [
    "__import__('os').system('true')", "().__class__", "a.b", "x[0]", "lambda: 1", "9**9**9", "2**(10**6)",
    "1" * 300, "x < y", "x; y", "x == y", "'s'",
])
def test_parse_safe_rejects_everything_outside_the_grammar(text):
    with pytest.raises((UnsafeExpression, SyntaxError)):
        parse_safe(text)


# (completion, label, expected score) written out by hand
MATH_CASES = [
    (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
    ("The answer is 0.5", r"\frac12", 1.0),
    ("#### 1,234", "1234", 1.0),
    (r"\boxed{\$18}", "18", 1.0),
    (r"\boxed{18 \text{ dollars}}", "18", 1.0),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0),
    (r"\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
    (r"\boxed{x = 3}", "3", 1.0),
    (r"\boxed{\pi/2}", r"\frac{\pi}{2}", 1.0),
    (r"\boxed{2, 1}", "1, 2", 1.0),            # bare lists: unordered
    (r"\boxed{(2, 1)}", "(1, 2)", 0.0),        # tuples: ordered
    (r"\boxed{3}", "4", 0.0),
    (r"\boxed{0.333}", "1/3", 0.0),
    (r"\boxed{x^2}", "x^3", 0.0),
    ("Natalia sold 72 clips.\n#### 72", "She sold 48 + 24 = 72.\n#### 72", 1.0),  # GSM8K-style gold
]


def test_math_verify_truth_table(math_reward):
    completions = [c for c, _, _ in MATH_CASES]
    labels = [y for _, y, _ in MATH_CASES]
    out = math_reward.score([""] * len(completions), completions, label=labels)
    assert out.errors == [None] * len(MATH_CASES)
    assert out.scores == [s for _, _, s in MATH_CASES]


def test_math_verify_no_answer_is_zero_not_error(math_reward):
    out = math_reward.score([""], ["I am not sure."], answer=["3"])  # the `answer` column works too
    assert out.scores == [0.0] and out.errors == [None] and out.info[0] == {"reason": "no answer"}


def test_math_verify_bad_gold_is_an_error_and_bad_answer_is_wrong(math_reward):
    out = math_reward.score(["", "", ""], [r"\boxed{3}", r"\boxed{__import__('os')}", r"\boxed{3}"],
                            label=["x[[", "3", None])
    assert out.scores[0] is None and "reference" in out.errors[0]
    assert out.scores[1] == 0.0 and out.errors[1] is None and out.info[1]["reason"] == "unparseable answer"
    assert out.scores[2] is None and out.errors[2]


def test_math_verify_never_evaluates_code(math_reward, tmp_path):
    marker = tmp_path / "pwned"
    payload = rf"\boxed{{__import__('os').system('touch {marker}')}}"
    out = math_reward.score([""], [payload], label=[payload])
    assert not marker.exists()
    assert out.scores[0] == 1.0 or out.errors[0] is not None  # equal strings may match; nothing ran


def test_math_verify_missing_label_column_names_the_fix(math_reward):
    with pytest.raises(ValueError, match="label"):
        math_reward.score([""], ["x"])


def test_math_verify_timeout_is_an_error_and_the_child_is_replaced():
    reward = MathVerify(timeout_s=0.001)
    try:
        reward.child._start()
        hung_pid = reward.child.pid
        out = reward.score([""], [r"\boxed{\sin(x)^2 + \cos(x)^2}"], label=["1"])
        assert out.scores == [None] and "timed out" in out.errors[0]
        with pytest.raises(ProcessLookupError):  # killed and reaped, not left running
            os.kill(hung_pid, 0)
        # the hung child was killed; a fresh one answers once the timeout allows it
        reward.child.timeout_s = 30
        out = reward.score([""], [r"\boxed{\sin(x)^2 + \cos(x)^2}"], label=["1"])
        assert out.scores == [1.0], out.errors
    finally:
        reward.close()


def test_the_checker_never_reruns_an_unguarded_main_script(tmp_path):
    """A training script without `if __name__ == "__main__"` must run once, not again inside the checker."""
    marker = tmp_path / "runs.txt"
    script = tmp_path / "train.py"
    script.write_text(
        "from align.rewards.verifiers import MathVerify\n"
        f"open({str(marker)!r}, 'a').write('run\\n')\n"
        "r = MathVerify(timeout_s=30)\n"
        "print(r.score([''], [r'\\boxed{(x+1)^2}'], label=['x^2+2x+1']).scores)\n"
        "r.close()\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[1.0]"
    assert marker.read_text() == "run\n"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the child's command line from /proc")
def test_the_sympy_checker_child_runs_isolated(math_reward):
    """`python -I` (align.tools._child): the child never resolves a top-level `rewards` (ours or PyPI's)."""
    math_reward.score([""], [r"\boxed{x+x}"], label=["2x"])  # starts the child
    argv = open(f"/proc/{math_reward.child.pid}/cmdline", "rb").read().split(b"\0")
    assert b"-I" in argv and any(b"align.rewards.verifiers.sympy_child" in a for a in argv), argv


def test_math_verify_pickles_without_its_child(math_reward):
    math_reward.score([""], [r"\boxed{x+x}"], label=["2x"])  # starts the child
    clone = pickle.loads(pickle.dumps(math_reward))
    assert clone._child is None and clone.timeout_s == math_reward.timeout_s


# ------------------------------------------------------------------------------------------------ format


def test_format_reward_default_pattern():
    r = FormatReward()
    out = r.score([""] * 3, ["<think>a\nb</think> <answer>4</answer>", "<answer>4</answer>", "<think>x</think>"])
    assert out.scores == [1.0, 0.0, 0.0] and out.errors == [None] * 3


def test_format_reward_modes_and_scores():
    r = FormatReward(pattern=r"\d+", mode="fullmatch", flags="", match_score=2.0, miss_score=-1.0)
    assert r.score(["", ""], ["123", "12a"]).scores == [2.0, -1.0]
    assert FormatReward(pattern="ANSWER", flags="i").score([""], ["the answer"]).scores == [1.0]


def test_format_reward_catastrophic_pattern_times_out_as_error():
    r = FormatReward(pattern=r"^(a|aa)+$", timeout_s=0.2)
    started = time.monotonic()
    out = r.score([""], ["a" * 5000 + "!"])
    assert time.monotonic() - started < 5
    assert out.scores == [None] and "timed out" in out.errors[0]


def test_format_reward_rejects_bad_configuration():
    with pytest.raises(ValueError, match="pattern"):
        FormatReward(pattern="(")
    with pytest.raises(ValueError, match="mode"):
        FormatReward(mode="findall")
    pickle.loads(pickle.dumps(FormatReward()))


# ------------------------------------------------------------------------------------------------ code


def test_extract_code_takes_the_last_block():
    assert extract_code("```python\na=1\n```\ntext\n```py\nb=2\n```") == "b=2\n"
    assert extract_code("no code") is None


ADD_TESTS = ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]


def test_code_tests_grades_per_test_in_the_sandbox():
    r = CodeTests(timeout_s=2, max_workers=2)
    completions = [
        "```python\ndef add(a, b):\n    return a + b\n```",
        "```python\ndef add(a, b):\n    return a * b\n```",   # 0*0 == 0 passes, 1*2 == 3 fails
        "```python\nimport sys\nsys.exit(0)\n```",             # exit 0 before the tests: no test passed
        "Sorry, I cannot write code.",
    ]
    out = r.score([""] * 4, completions, tests=[ADD_TESTS] * 4)
    assert out.errors == [None] * 4
    assert out.scores == [1.0, 0.5, 0.0, 0.0]
    assert CodeTests(partial_credit=False).score([""], [completions[1]], tests=[ADD_TESTS]).scores == [0.0]


def test_code_tests_timeout_is_a_wrong_answer_and_later_batches_still_grade():
    r = CodeTests(timeout_s=1, max_workers=2)
    looping = "```python\ndef add(a, b):\n    while True:\n        pass\n```"
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    out = r.score(["", ""], [looping, good], tests=[ADD_TESTS] * 2)
    assert out.scores == [0.0, 1.0] and out.errors == [None, None]
    assert out.info[0]["reason"] == "timeout"
    # a timed-out program must not take the sandbox down for the next batch
    out = r.score([""], [good], tests=[ADD_TESTS])
    assert out.scores == [1.0], out.errors


def test_code_tests_sandbox_failure_is_an_error(monkeypatch):
    import align.tools.sandbox as sandbox
    from align import tools

    def broken(code, tests=None, timeout_s=None, memory_mb=None, **kw):
        return sandbox.ExecResult("sandbox_error", failed=len(tests or []), error="bwrap missing")

    monkeypatch.setattr(sandbox, "run_code", broken)
    if hasattr(tools, "run_code"):
        monkeypatch.setattr(tools, "run_code", broken)
    out = CodeTests().score([""], ["def add(a, b): return a + b"], tests=[ADD_TESTS])
    assert out.scores == [None] and "sandbox" in out.errors[0]


def test_code_tests_needs_tests():
    r = CodeTests()
    with pytest.raises(ValueError, match="tests"):
        r.score([""], ["x"])
    out = r.score([""], ["x = 1"], tests=[[]])
    assert out.scores == [None] and out.errors[0] == "no tests for this sample"
