"""Honest grading: parse each test outside the sandbox, send only its expression in, compare the value outside.

`plan(test)` reads one test string with `ast` (never executing it) and picks a grading mode:

  "outside"    the test has one of the forms below. Only the EXPRESSION enters the sandbox; the child
               evaluates it in the program's namespace and sends its value back as plain data text
               (`tools/_grading_wire.py`); `grade()` decodes that text here into genuine builtins and
               compares it with the expected value, which never entered the sandbox.
  "in_sandbox" anything else (multi-statement tests, loops, `abs(f(x) - 1.5) < 1e-6`, `f(x) == g(y)`, ...):
               the statement runs in the program's own interpreter exactly as before this module existed, so
               a hostile program can fake it. Results report the mode per test; `code_tests` refuses it
               unless `strict=False`.

Outside forms (an optional `, "message"` after any of them is allowed; its literal text is the failure reason):
  assert E == L   /  assert L == E      value == expected
  assert E != L   /  assert L != E      value != expected
  assert E is None / is not None / is True / is False
  assert math.isclose(E, L[, rel_tol=L][, abs_tol=L])   (or isclose(...), either argument order)
  assert P        /  assert not P       bool(value) is True / False
where L is a literal (`ast.literal_eval`, plus set(...), frozenset(...), tuple(...), list(...), sorted(...) of
a literal and float('inf' | '-inf' | 'nan')); E is a name (`answer`) or a call, method call or subscript over
calls (`f(1, [2])`, `sorted(f(x))`, `Solution().two_sum([2, 7], 9)`, `f(x)[0]`, `f(x)[1:]`) whose arguments are literals, names or such
expressions - no comparison, `and`/`or`/`not`, lambda or comprehension anywhere inside it. A test whose
expectation is a truth value (P, `not P`, `== True`/`False`, `is True`/`False`) carries its real expectation
inside the expression, so there P must be a direct call of a non-builtin name (the function under test,
`is_prime(7)`): `assert isinstance(f(x), int)` or `assert operator.eq(f(x), 3)` would let a program's own
`__class__` / `__eq__` decide, and run "in_sandbox" instead.

Comparison rule: Python's own `==` / `!=` / `is` / `bool()` / `math.isclose` applied to the decoded value and
the expected literal, both genuine builtins here (no object the program made survives the trip). So the
verdict is exactly what the test's `assert` gives in CPython for the same plain value: 1 == 1.0 == True,
(1, 2) != [1, 2], {1: 'a'} == {1: 'a'}, nan != nan, 0.1 + 0.2 != 0.3. No tolerance is added: a test that wants
one says so with math.isclose, graded outside with its own rel_tol / abs_tol.
"""
from __future__ import annotations

import ast
import builtins
import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

OUTSIDE, IN_SANDBOX = "outside", "in_sandbox"
MODES = (OUTSIDE, IN_SANDBOX)
_BUILTIN_NAMES = frozenset(dir(builtins))
_EXPECTED_CALLS = {"set": set, "frozenset": frozenset, "tuple": tuple, "list": list, "sorted": sorted}
_FORBIDDEN = (ast.Compare, ast.BoolOp, ast.Lambda, ast.IfExp, ast.NamedExpr, ast.ListComp, ast.SetComp,
              ast.DictComp, ast.GeneratorExp, ast.Await, ast.Yield, ast.YieldFrom, ast.Starred)
MAX_VALUE_TEXT = 256 * 1024 + 1024  # a little over the child's own cap (tools/_grading_wire.py MAX_TEXT)


@dataclass(frozen=True)
class TestPlan:
    """How one test string is graded. `expr` enters the sandbox (outside mode); `expected` never does."""

    source: str
    mode: str
    expr: str | None = None
    check: str | None = None  # eq | ne | is | is_not | truthy | falsy | isclose
    expected: Any = None
    tolerances: dict = field(default_factory=dict)
    message: str = ""  # the failure reason on a mismatch (the assert's literal message, else "")
    why: str | None = None  # why the test runs in_sandbox

    def wire(self) -> Any:
        """What the zygote receives: {"eval": expression} (outside) or the statement string (in_sandbox)."""
        return {"eval": self.expr} if self.mode == OUTSIDE else self.source


def _literal(node: ast.AST) -> tuple[bool, Any]:
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        pass
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords
            and len(node.args) <= 1):
        name = node.func.id
        if name in _EXPECTED_CALLS:
            ok, arg = _literal(node.args[0]) if node.args else (True, ())
            if ok:
                try:
                    return True, _EXPECTED_CALLS[name](arg)
                except TypeError:
                    return False, None
        if name == "float" and len(node.args) == 1:
            ok, arg = _literal(node.args[0])
            if ok and isinstance(arg, str) and arg.strip().lower() in ("inf", "-inf", "+inf", "nan", "infinity"):
                return True, float(arg)
    return False, None


def _clean(node: ast.AST) -> bool:
    return not any(isinstance(n, _FORBIDDEN) or (isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.Not))
                   for n in ast.walk(node))


def _arg(node: ast.AST) -> bool:
    if isinstance(node, ast.Name) or _value_expr(node):
        return True
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return all(_arg(e) for e in node.elts)
    if isinstance(node, ast.Slice):
        return all(part is None or _arg(part) for part in (node.lower, node.upper, node.step))
    return _literal(node)[0]


def _value_expr(node: ast.AST) -> bool:
    """A call / method call / subscript over calls with plain arguments (the module docstring's E)."""
    if isinstance(node, ast.Subscript):
        return _value_expr(node.value) and _arg(node.slice)
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    if isinstance(f, ast.Attribute):
        if not (isinstance(f.value, ast.Name) or _value_expr(f.value)):
            return False
    elif not isinstance(f, ast.Name):
        return False
    return all(_arg(a) for a in node.args) and all(k.arg is not None and _arg(k.value) for k in node.keywords)


def _program_call(node: ast.AST) -> bool:
    """A direct call of a non-builtin name: the program's function decides the value, nothing else does."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id not in _BUILTIN_NAMES and _value_expr(node))


def _isclose(node: ast.AST) -> bool:
    f = node.func if isinstance(node, ast.Call) else None
    return (isinstance(f, ast.Name) and f.id == "isclose") or (
        isinstance(f, ast.Attribute) and f.attr == "isclose" and isinstance(f.value, ast.Name) and f.value.id == "math")


def _in_sandbox(test: str, why: str) -> TestPlan:
    return TestPlan(test, IN_SANDBOX, why=why)


@lru_cache(maxsize=4096)
def plan(test: str) -> TestPlan:
    """The grading plan of one test string (cached: datasets repeat their tests across rollouts)."""
    try:
        tree = ast.parse(test, mode="exec")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return _in_sandbox(test, "not valid Python")
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        return _in_sandbox(test, "not a single assert statement")
    stmt = tree.body[0]
    message = ""
    if stmt.msg is not None:
        ok, msg = _literal(stmt.msg)
        if not ok or not isinstance(msg, str):
            return _in_sandbox(test, "the assert message is not a string literal")
        message = msg
    node = stmt.test

    def outside(expr: ast.AST, check: str, expected: Any = None, strong: bool = False, **tol) -> TestPlan:
        good = _program_call(expr) if strong else (_value_expr(expr) or isinstance(expr, ast.Name))
        if not (good and _clean(expr)):
            return _in_sandbox(test, "the tested expression is not a plain call of the program's code"
                               if strong else "the tested expression is not a call with plain arguments")
        text = ast.get_source_segment(test, expr) or ast.unparse(expr)
        return TestPlan(test, OUTSIDE, expr=text, check=check, expected=expected, tolerances=tol, message=message)

    if isinstance(node, ast.Compare) and len(node.ops) == 1:
        op, left, right = node.ops[0], node.left, node.comparators[0]
        if isinstance(op, (ast.Eq, ast.NotEq)):
            check = "eq" if isinstance(op, ast.Eq) else "ne"
            for expr, lit in ((left, right), (right, left)):  # the literal on the right first
                ok, expected = _literal(lit)
                if ok:
                    return outside(expr, check, expected, strong=isinstance(expected, bool))
            return _in_sandbox(test, "neither side of the comparison is a literal")
        if isinstance(op, (ast.Is, ast.IsNot)) and isinstance(right, ast.Constant) and right.value in (None, True, False) \
                and type(right.value) in (type(None), bool):
            return outside(left, "is" if isinstance(op, ast.Is) else "is_not", right.value,
                           strong=right.value is not None)
        return _in_sandbox(test, "a comparison other than ==, != or is None/True/False")
    if _isclose(node) and len(node.args) == 2 and all(k.arg in ("rel_tol", "abs_tol") for k in node.keywords):
        tol = {}
        for k in node.keywords:
            ok, v = _literal(k.value)
            if not ok or type(v) not in (int, float):
                return _in_sandbox(test, "math.isclose with a non-literal tolerance")
            tol[k.arg] = v
        for expr, lit in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
            ok, expected = _literal(lit)
            if ok and type(expected) in (int, float):
                return outside(expr, "isclose", expected, **tol)
        return _in_sandbox(test, "math.isclose without a literal number")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return outside(node.operand, "falsy", strong=True)
    return outside(node, "truthy", strong=True)


def decode(text: str) -> Any:
    """Plain-data text from the child -> genuine builtins; raises ValueError for anything else."""
    if not isinstance(text, str) or len(text) > MAX_VALUE_TEXT:
        raise ValueError("the value text is missing or too large")
    try:
        return _decode(json.loads(text))
    except (TypeError, RecursionError, MemoryError) as exc:  # TypeError: an unhashable set member / dict key
        raise ValueError(f"not plain data ({type(exc).__name__})") from None


def _decode(x: Any) -> Any:
    if x is None or type(x) in (bool, int, float, str):
        return x
    if type(x) is list:
        return [_decode(e) for e in x]
    if type(x) is dict and len(x) == 1:
        (tag, body), = x.items()
        if tag == "bytes" and type(body) is str:
            return bytes.fromhex(body)
        if type(body) is list:
            if tag == "tuple":
                return tuple(_decode(e) for e in body)
            if tag == "set":
                return {_decode(e) for e in body}
            if tag == "dict" and all(type(p) is list and len(p) == 2 for p in body):
                return {_decode(k): _decode(v) for k, v in body}
    raise ValueError("not plain data")


def grade(p: TestPlan, value_text: str) -> tuple[bool, str | None]:
    """(passed, failure reason) for an outside-graded test, given the child's value text."""
    try:
        value = decode(value_text)
    except ValueError:
        return False, "not plain data: the value could not be decoded"
    try:
        if p.check == "eq":
            ok = value == p.expected
        elif p.check == "ne":
            ok = value != p.expected
        elif p.check == "is":
            ok = value is p.expected
        elif p.check == "is_not":
            ok = value is not p.expected
        elif p.check == "truthy":
            ok = bool(value)
        elif p.check == "falsy":
            ok = not value
        elif p.check == "isclose":
            if type(value) not in (int, float, bool):
                return False, p.message
            ok = math.isclose(value, p.expected, **p.tolerances)
        else:
            raise ValueError(f"unknown check {p.check!r}")
    except RecursionError:
        return False, "not plain data: nested too deeply to compare"
    return bool(ok), (None if ok else p.message)


__all__ = ["IN_SANDBOX", "MODES", "OUTSIDE", "TestPlan", "decode", "grade", "plan"]
