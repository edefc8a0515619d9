"""Arithmetic over a whitelisted `ast`, never `eval` / `sympify` on raw text.

Two number backends share one walker: "sympy" (exact rationals, symbolic constants, the default calculator)
and "float" (Python int/float semantics, what Themis's numexpr-based calculator produced: `3/5*100` is
60.00000000000001, `12+2+2` prints as 16, `48/4` as 12.0). Every input is bounded before any arithmetic:
length, ASCII-only text (Unicode look-alikes normalise to real names inside the parser), node count, depth,
exponent size, result size and factorial argument. Pure computation: the caller runs it in a killable child.
"""
from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass

from align.errors import AlignError


class CalcError(AlignError, ValueError):
    """The expression is not allowed or cannot be evaluated; the message says why."""


@dataclass(frozen=True)
class CalcLimits:
    max_chars: int = 2000
    max_nodes: int = 400
    max_depth: int = 40
    max_exponent: int = 10_000  # |integer exponent|
    max_result_bits: int = 40_000  # ~12,000 decimal digits
    max_factorial: int = 1000

    def __post_init__(self):
        for k, v in vars(self).items():
            if v <= 0:
                raise ValueError(f"CalcLimits.{k} must be > 0, got {v}")


_ALLOWED_TEXT = re.compile(r"[0-9A-Za-z_\s\.\+\-\*/%\(\),\^]*")
_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)


def parse(expr: str, limits: CalcLimits = CalcLimits()) -> ast.AST:
    """Validate text and tree shape; returns the expression node. Raises CalcError."""
    if not isinstance(expr, str):
        raise CalcError("expression must be a string")
    text = expr.strip()
    if not text:
        raise CalcError("empty expression")
    if len(text) > limits.max_chars:
        raise CalcError(f"expression longer than {limits.max_chars} characters")
    if not text.isascii() or not _ALLOWED_TEXT.fullmatch(text):
        bad = next((c for c in text if not _ALLOWED_TEXT.fullmatch(c)), "?")
        raise CalcError(f"character {bad!r} is not allowed in an arithmetic expression")
    if "__" in text:
        raise CalcError("dunder names are not allowed")
    depth = cur = 0
    for ch in text:  # reject deep nesting before the parser (which recurses) sees it
        cur += ch == "("
        cur -= ch == ")"
        depth = max(depth, cur)
    if depth > limits.max_depth:
        raise CalcError(f"parentheses nested deeper than {limits.max_depth}")
    if re.search(r"[\+\-]{%d,}" % (limits.max_depth + 1), text.replace(" ", "")):
        raise CalcError(f"more than {limits.max_depth} unary signs in a row")
    text = text.replace("^", "**")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
        raise CalcError(f"not a valid expression: {exc.__class__.__name__}") from None
    nodes = 0
    stack = [(tree.body, 1)]
    while stack:
        node, d = stack.pop()
        nodes += 1
        if nodes > limits.max_nodes:
            raise CalcError(f"expression has more than {limits.max_nodes} nodes")
        if d > limits.max_depth:
            raise CalcError(f"expression nested deeper than {limits.max_depth}")
        if isinstance(node, ast.BinOp):
            if not isinstance(node.op, _BINOPS):
                raise CalcError(f"operator {type(node.op).__name__} is not allowed")
            stack += [(node.left, d + 1), (node.right, d + 1)]
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, (ast.UAdd, ast.USub)):
                raise CalcError(f"operator {type(node.op).__name__} is not allowed")
            stack.append((node.operand, d + 1))
        elif isinstance(node, ast.Constant):
            if type(node.value) not in (int, float):
                raise CalcError(f"constant {node.value!r} is not a number")
        elif isinstance(node, ast.Name):
            pass  # checked against the backend's names at evaluation
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.keywords:
                raise CalcError("only plain function calls like sqrt(2) are allowed")
            stack += [(a, d + 1) for a in node.args]
            if any(isinstance(a, ast.Starred) for a in node.args):
                raise CalcError("starred arguments are not allowed")
        else:
            raise CalcError(f"{type(node).__name__} is not allowed in an arithmetic expression")
    return tree.body


class _Walker:
    """Evaluates a validated tree with one backend's numbers, checking sizes after each step."""

    def __init__(self, limits: CalcLimits):
        self.limits = limits

    def run(self, node):
        if isinstance(node, ast.Constant):
            return self.check(self.number(node.value))  # '1e999' is already infinite
        if isinstance(node, ast.Name):
            if node.id not in self.constants:
                raise CalcError(f"unknown name {node.id!r}")
            return self.constants[node.id]
        if isinstance(node, ast.UnaryOp):
            v = self.run(node.operand)
            return -v if isinstance(node.op, ast.USub) else +v
        if isinstance(node, ast.Call):
            fn = self.functions.get(node.func.id)
            if fn is None:
                raise CalcError(f"unknown function {node.func.id!r}")
            return self.check(fn(*[self.run(a) for a in node.args]))
        left, right = self.run(node.left), self.run(node.right)
        op = node.op
        if isinstance(op, ast.Pow):
            return self.check(self.power(left, right))
        if isinstance(op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise CalcError("division by zero")
        if isinstance(op, ast.Add):
            out = left + right
        elif isinstance(op, ast.Sub):
            out = left - right
        elif isinstance(op, ast.Mult):
            out = left * right
        elif isinstance(op, ast.Div):
            out = self.divide(left, right)
        elif isinstance(op, ast.FloorDiv):
            out = left // right
        else:
            out = left % right
        return self.check(out)

    def power_guard(self, base_bits: float, exponent) -> None:
        try:
            e = float(exponent)
        except (TypeError, ValueError, OverflowError):
            raise CalcError("exponent is not a real number") from None
        if not math.isfinite(e) or abs(e) > self.limits.max_exponent:
            raise CalcError(f"exponent {exponent} exceeds the cap {self.limits.max_exponent}")
        if base_bits * abs(e) > self.limits.max_result_bits:
            raise CalcError(f"result of the power exceeds {self.limits.max_result_bits} bits")


class FloatWalker(_Walker):
    """Python int/float semantics (Themis's calculator)."""

    constants = {"pi": math.pi, "e": math.e}

    def __init__(self, limits: CalcLimits):
        super().__init__(limits)

        def ceil(x):
            return float(math.ceil(x))

        def floor(x):
            return float(math.floor(x))

        def fact(x):
            if x != int(x) or x < 0 or x > limits.max_factorial:
                raise CalcError(f"factorial argument must be an integer in [0, {limits.max_factorial}]")
            return math.factorial(int(x))

        self.functions = {"sqrt": math.sqrt, "exp": math.exp, "log": math.log, "ln": math.log, "log10": math.log10,
                          "sin": math.sin, "cos": math.cos, "tan": math.tan, "abs": abs, "ceil": ceil,
                          "floor": floor, "round": round, "factorial": fact, "min": min, "max": max}

    def number(self, v):
        return v

    def divide(self, a, b):
        return a / b

    def power(self, a, b):
        if isinstance(a, int):
            bits = float(max(1, abs(a).bit_length() - 1)) if a not in (0, 1, -1) else 1.0
        else:
            bits = max(1.0, abs(math.log2(abs(a)))) if a not in (0, 1, -1) and math.isfinite(a) else 1.0
        self.power_guard(bits, b)
        try:
            return a ** b
        except (OverflowError, ZeroDivisionError) as exc:
            raise CalcError(f"power failed: {exc}") from None

    def check(self, v):
        if isinstance(v, complex):
            raise CalcError("complex result")
        cap = min(self.limits.max_result_bits, 13_000)  # Python cannot print ints over ~4,300 digits
        if isinstance(v, int) and v.bit_length() > cap:
            raise CalcError(f"result exceeds {cap} bits")
        if isinstance(v, float) and not math.isfinite(v):
            raise CalcError("result is not finite")
        return v


class SympyWalker(_Walker):
    """Exact arithmetic with sympy objects (Integer, Rational, Float, pi, sqrt(2), ...)."""

    def __init__(self, limits: CalcLimits):
        super().__init__(limits)
        import sympy

        self.sp = sympy

        def fact(x):
            if not (x.is_Integer and 0 <= x <= limits.max_factorial):
                raise CalcError(f"factorial argument must be an integer in [0, {limits.max_factorial}]")
            return sympy.factorial(x)

        def rounding(f):
            def g(x):
                if not x.is_real:
                    raise CalcError("rounding needs a real number")
                return f(x)
            return g

        self.constants = {"pi": sympy.pi, "e": sympy.E, "E": sympy.E}
        self.functions = {"sqrt": sympy.sqrt, "exp": sympy.exp, "log": sympy.log, "ln": sympy.log,
                          "log10": lambda x: sympy.log(x, 10), "sin": sympy.sin, "cos": sympy.cos,
                          "tan": sympy.tan, "abs": sympy.Abs, "ceil": rounding(sympy.ceiling),
                          "floor": rounding(sympy.floor), "round": rounding(lambda x: sympy.Integer(round(float(x)))),
                          "factorial": fact, "min": sympy.Min, "max": sympy.Max}

    def number(self, v):
        return self.sp.Integer(v) if isinstance(v, int) else self.sp.Float(repr(v), 15)

    def divide(self, a, b):
        return a / b

    def power(self, a, b):
        if b.is_number and a.is_number:
            if a.is_zero and b.is_negative:
                raise CalcError("division by zero")
            absa = abs(a)
            bits = 1.0
            if absa.is_Rational and absa not in (0, 1):
                bits = float(max(1, int(absa.p).bit_length() + int(absa.q).bit_length() - 1))
            elif absa.is_number and absa.is_finite:
                try:
                    bits = max(1.0, abs(math.log2(float(absa.evalf(15))))) if absa != 0 else 1.0
                except (TypeError, ValueError, OverflowError):
                    raise CalcError("power base is not a real number") from None
            self.power_guard(bits, b.evalf(15))
        return a ** b

    def check(self, v):
        sp = self.sp
        if v is sp.nan or v in (sp.zoo, sp.oo, -sp.oo) or getattr(v, "is_finite", True) is False:
            raise CalcError("result is not finite")
        if v.is_Rational and max(abs(v.p).bit_length(), abs(v.q).bit_length()) > self.limits.max_result_bits:
            raise CalcError(f"result exceeds {self.limits.max_result_bits} bits")
        if v.is_number and v.is_real is False:
            raise CalcError("complex result")
        if sp.count_ops(v) > self.limits.max_nodes:
            raise CalcError("symbolic result too large")
        return v


def evaluate(expr: str, backend: str = "sympy", limits: CalcLimits = CalcLimits()):
    """Evaluate `expr` with a backend ("sympy" or "float"); raises CalcError."""
    node = parse(expr, limits)
    walker = SympyWalker(limits) if backend == "sympy" else FloatWalker(limits)
    try:
        return walker.run(node)
    except CalcError:
        raise
    except (ArithmeticError, ValueError, TypeError, RecursionError, MemoryError) as exc:
        raise CalcError(f"{type(exc).__name__}: {exc}") from None


def format_sympy(v) -> str:
    """Exact integers/rationals as such (with a decimal for fractions), otherwise 15 significant digits."""
    import sympy

    if v.is_Rational and max(int(v.p).bit_length(), int(v.q).bit_length()) > 13_000:
        return str(v.evalf(15))  # Python refuses to print integers over ~4,300 digits
    if v.is_Integer:
        return str(v)
    if v.is_Rational:
        return f"{v} = {sympy.Float(v, 15)}"
    num = v.evalf(15)
    if num.is_Float:
        text = str(num)
        return text.rstrip("0").rstrip(".") if "." in text and "e" not in text else text
    return str(num)


# -------------------------------------------------------------------------------- Themis GSM8K annotations
_ANNOTATION = re.compile(r"<{1,2}([^<>]*)>>\s*([^\s,<]*)")
_NUMBER = re.compile(r"\s*\$?\s*(-?[\d,]*\.?\d+)")

VERDICT_BOTH_CORRECT = "Both the calculation and the answer are correct."


def reference_number(text: str | None, mode: str = "numeric") -> float | None:
    """The number in a final answer such as '#### 1,200' / '40%' / '4 nights'.

    mode="themis" reproduces the released TARA data, whose tool kept only the digits ('9.00' -> 900.0).
    """
    if text is None:
        return None
    if mode == "themis":
        digits = re.sub(r"[^\d]", "", text)
        return float(digits) if digits else None
    m = _NUMBER.match(text)
    if not m:
        return None
    try:
        return float(m.group(1).replace(",", ""))
    except ValueError:
        return None


def final_answer_text(answer: str | None) -> str | None:
    """The text after GSM8K's '####' marker, or None."""
    if not answer:
        return None
    m = re.search(r"####\s*(.*)", answer)
    return m.group(1).strip() if m else None


def themis_verdict(annotations: str, reference: float | None, limits: CalcLimits = CalcLimits()) -> str:
    """Themis's calculator verdict for GSM8K annotations '<<expr=value>>value, ...'.

    Each expr is evaluated with float semantics and compared with the value written after '>>' (the process
    is correct iff all match); the last computed value is compared with the reference answer.
    """
    process_ok, last, seen = True, None, 0
    for m in _ANNOTATION.finditer(annotations or ""):
        seen += 1
        content, written = m.group(1), m.group(2)
        parts = content.split("=")
        if len(parts) < 2:
            process_ok = False
            continue
        try:
            value = evaluate(parts[0], "float", limits)
        except CalcError:
            process_ok = False
            continue
        last = value
        stated = reference_number(written.rstrip(".")) if written.strip(". ") else reference_number(parts[-1])
        if stated is None or value != stated:
            process_ok = False
    if seen == 0:
        process_ok = False
    matches = last is not None and reference is not None and last == reference
    if process_ok and matches:
        return VERDICT_BOTH_CORRECT
    if process_ok:
        return (f"The calculation process is correct, but the resulting answer {last} does not match the "
                f"predicted answer {reference}.")
    if matches:
        return ("The calculation process is incorrect, but the answer matches the predicted answer. Details: "
                "An unexpected error occurred during the calculation.")
    return ("Both the calculation and the answer are incorrect. Details: An unexpected error occurred during the "
            f"calculation. The calculated answer {last} does not match the predicted answer {reference}.")


__all__ = ["CalcError", "CalcLimits", "evaluate", "parse", "format_sympy", "themis_verdict", "reference_number",
           "final_answer_text", "VERDICT_BOTH_CORRECT"]
