"""Calculator: values against hand-computed references, Themis verdicts on hand-made annotations, and hostile
inputs (each answered within 2 s with an error, no exception, nothing run)."""
from __future__ import annotations

import os
import time
from fractions import Fraction

import pytest

from align import tools
from align.tools.calc_eval import CalcError, evaluate, reference_number, themis_verdict
from align.tools.calculator import get_calculator_pool


@pytest.fixture(scope="module")
def calc():
    c = tools.Calculator(timeout_s=2.0)
    get_calculator_pool(c.workers, c.memory_mb).warm()
    return c


@pytest.mark.parametrize("expr,expected", [
    ("1+2*3", Fraction(7)), ("3/5*100", Fraction(60)), ("(7-3)*0.5", Fraction(2)), ("2^10", Fraction(1024)),
    ("10 // 3", Fraction(3)), ("10 % 4", Fraction(2)), ("-(-5)", Fraction(5)), ("factorial(5)", Fraction(120)),
    ("1/3 + 1/6", Fraction(1, 2)),
])
def test_exact_values(expr, expected):
    v = evaluate(expr)
    assert Fraction(str(v)) == expected if v.is_Rational else abs(float(v) - float(expected)) < 1e-12


def test_float_backend_matches_python_semantics():
    # Themis's numexpr-era tool: int stays int, '/' is true division with IEEE rounding
    assert evaluate("0.1*3", "float") == 0.30000000000000004 and evaluate("3/5*100", "float") == 60.0
    assert repr(evaluate("12+2+2", "float")) == "16" and repr(evaluate("48/4", "float")) == "12.0"
    assert evaluate("ceil(2.4)", "float") == 3.0


def test_calculator_tool_plain(calc):
    assert calc("sqrt(16) + 2**3").output == "12"
    assert calc("1/3").output.startswith("1/3 = 0.33333")
    assert float(calc("pi").output) == pytest.approx(3.14159265358979, abs=1e-12)


def test_themis_verdicts_hand_made():
    ok = "<<40*4=160>>160, <<160+40=200>>200"
    assert themis_verdict(ok, 200.0) == "Both the calculation and the answer are correct."
    assert themis_verdict(ok, 210.0) == ("The calculation process is correct, but the resulting answer 200 does "
                                         "not match the predicted answer 210.0.")
    wrong_step = "<<40*4=150>>150, <<150+50=200>>200"
    assert themis_verdict(wrong_step, 200.0).startswith("The calculation process is incorrect, but the answer matches")
    assert themis_verdict("", 10.0).endswith("The calculated answer None does not match the predicted answer 10.0.")
    assert themis_verdict("<<0.1*3=0.3>>0.3", 0.3).startswith("Both the calculation and the answer are incorrect")  # IEEE


def test_reference_number_modes():
    assert reference_number("1,200") == 1200.0 and reference_number("40%") == 40.0
    assert reference_number("4 nights") == 4.0 and reference_number("9.00") == 9.0
    assert reference_number("9.00", "themis") == 900.0


def test_themis_mode_reads_reference_from_context(calc):
    ctx = {"answer": "She pays 40*4 = <<40*4=160>>160.\n#### 160"}
    assert calc("<<40*4=160>>160", ctx).output == "Both the calculation and the answer are correct."
    ctx_ref = {**ctx, "reference_answer": "#### 170"}
    assert "does not match the predicted answer 170.0" in calc("<<40*4=160>>160", ctx_ref).output


HOSTILE = [
    "__import__('os').system('touch /tmp/calc_pwned')",
    "().__class__.__bases__[0].__subclasses__()",
    "(1).__class__",
    "𝐞𝐱𝐞𝐜('1')",  # mathematical bold letters normalise to 'exec' inside the parser
    "ｅｖａｌ('1')",  # full-width letters
    "9**9**9",
    "2**2**2**2**2**2",
    "10**10**10**10",
    "factorial(10**7)",
    "factorial(factorial(20))",
    "N(pi, 10**6)",
    "(" * 100_000 + "1" + ")" * 100_000,
    "-" * 100_000 + "1",
    "(" * 30 + "-" * 60 + "1" + ")" * 30,
    "1/0",
    "5 % 0",
    "0**-1",
    "",
    "   ",
    "nan",
    "inf",
    "1e400*1e400 - 1e400*1e400",
    "lambda: 1",
    "[1]*10**9",
    "'a'*10**9",
    "open('/etc/passwd')",
    "1e999",
    "-1e999 + 1",
    "(10**4000)**(10**4000)",
    "exp(10**9)*0 + 1e999",
]


@pytest.mark.parametrize("expr", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_inputs_answered_fast_with_error(calc, expr):
    t0 = time.monotonic()
    res = calc(expr)
    assert time.monotonic() - t0 < 2.0
    assert not res.ok and res.error
    assert not os.path.exists("/tmp/calc_pwned")


def test_hostile_never_raises_in_process():
    for expr in HOSTILE:
        try:
            evaluate(expr)
        except CalcError:
            continue
        pytest.fail(f"{expr[:30]!r} evaluated")


def test_runaway_computation_is_killed_and_pool_recovers():
    # limits far above the defaults let a slow power through: the child deadline must kill it
    from align.tools.calc_eval import CalcLimits

    slow = tools.Calculator(timeout_s=0.5, limits=CalcLimits(max_exponent=10**9, max_result_bits=10**12), workers=1)
    get_calculator_pool(1, slow.memory_mb).warm()  # time the kill, not the child's sympy import
    t0 = time.monotonic()
    res = slow("7**123456789 % 10")
    assert time.monotonic() - t0 < 2.0
    assert not res.ok and res.error.startswith("timeout")
    assert slow("2+2").output == "4"


def test_non_string_input():
    assert not tools.get_tool("calculator")(None).ok  # type: ignore[arg-type]


def test_big_but_allowed_results_print(calc):
    out = calc("(10**4000)**2").output  # beyond Python's 4,300-digit print limit: shown in floating point
    assert out == "1.00000000000000e+8000"
    assert calc("2**100").output == str(2**100)
    assert calc("2**-3").output == "1/8 = 0.125000000000000"


def test_random_expressions_match_fraction_reference():
    # independent reference: the same (trusted, generated) expression evaluated by Python over Fractions
    import random

    rng = random.Random(0)

    def gen(depth):
        if depth == 0 or rng.random() < 0.3:
            return str(rng.randint(0, 50))
        op = rng.choice("+-*/")
        return f"({gen(depth - 1)} {op} {gen(depth - 1)})"

    checked = 0
    for _ in range(300):
        expr = gen(4)
        ref_src = __import__("re").sub(r"(\d+)", r"Fraction(\1)", expr)
        try:
            ref = eval(ref_src, {"Fraction": Fraction})  # noqa: S307 - our own generated text
        except ZeroDivisionError:
            with pytest.raises(CalcError, match="division by zero"):
                evaluate(expr)
            continue
        got = evaluate(expr)
        assert Fraction(int(got.p), int(got.q)) == ref, expr
        assert evaluate(expr, "float") == pytest.approx(float(ref), rel=1e-9, abs=1e-9)
        checked += 1
    assert checked > 200
