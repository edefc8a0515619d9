"""Rule verifiers: math answer equivalence (sympy), code correctness (sandboxed tests), format (regex).

Every verifier separates two outcomes that a silent 0.0 would conflate:
- a wrong (or missing) answer is the model's fault: score 0.0, with `info["reason"]` saying why;
- a check that could not decide (timeout, unparseable gold label, sandbox down) is an infrastructure
  failure: the sample gets an explicit error and no score, so it never reaches the advantages.

Math answers are never handed to `sympify`/`eval`: the extracted short answer is normalised (LaTeX -> plain),
checked against a strict character whitelist, parsed with `ast` and validated with caps on length, node
count, depth, integer size and exponents; sympy objects are only built in a killable child process, and each
equivalence check runs under a wall-clock timeout (sympy hangs have stalled RL jobs in verl and rllm).
"""
from __future__ import annotations

import ast
import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Sequence

from align.errors import AlignError
from align.rewards.base import RewardFunction, RewardOutput

# ---------------------------------------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------------------------------------

MAX_ANSWER_CHARS = 200
MAX_BOX_TRIES = 16
MAX_SCAN_CHARS = 50_000  # final answers sit at the end: longer completions are searched in their tail

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_HASH = re.compile(r"####\s*([^\n]*)")
_ANSWER_IS = re.compile(r"(?:final\s+answer|answer)\s*(?:is|:|=)\s*:?\s*(.+?)(?:\.\s|\.?$|\n)", re.IGNORECASE | re.MULTILINE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _balanced(text: str, start: int) -> tuple[str, int] | None:
    """The contents of the brace group opening at text[start] == '{', and the index after it."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
    return None


def extract_boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...} (or \\fbox{...}, or `\\boxed 5`) in `text`, or None."""
    # from the last \boxed backwards, a bounded number of tries: adversarial text of many unbalanced boxes
    # must not cost O(n^2)
    for m in list(_BOXED.finditer(text))[::-1][:MAX_BOX_TRIES]:
        j = m.end()
        if j < len(text) and text[j] == "{":
            group = _balanced(text, j)
            if group is not None:
                return group[0]
        elif j < len(text):
            token = re.match(r"[^\s$]+", text[j:j + MAX_ANSWER_CHARS])
            if token:
                return token.group(0)
    return None


def extract_answer(text: str, *, last_number: bool = False) -> str | None:
    """The final answer of a completion: last \\boxed{}, else `#### X`, else `answer is X`, else (optionally)
    the last number. None when there is none."""
    if not isinstance(text, str):
        return None
    text = text[-MAX_SCAN_CHARS:]
    boxed = extract_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    hashes = _HASH.findall(text)
    if hashes and hashes[-1].strip():
        return hashes[-1].strip()
    said = _ANSWER_IS.findall(text)
    if said and said[-1].strip():
        return said[-1].strip()
    if last_number:
        numbers = _NUMBER.findall(text)
        if numbers:
            return numbers[-1]
    return None


# ---------------------------------------------------------------------------------------------------------
# Normalisation: LaTeX and prose -> a plain expression string
# ---------------------------------------------------------------------------------------------------------

_DROP = [r"\left", r"\right", r"\displaystyle", r"\!", r"\,", r"\;", r"\:", r"\ ", "~", r"\quad", r"\qquad"]
_TEXT_CMDS = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{")
_SIMPLE_LATEX = {
    r"\cdot": "*", r"\times": "*", r"\div": "/", r"\pi": " pi ", r"\infty": " oo ", r"\ln": " ln ",
    r"\log": " log ", r"\sin": " sin ", r"\cos": " cos ", r"\tan": " tan ", r"\exp": " exp ",
    r"\%": "", "%": "", r"\$": "", "$": "", r"^\circ": "", r"^{\circ}": "", r"\circ": "", r"\degree": "",
}
_UNIT_TAIL = re.compile(r"^([-+]?[\d.]*\d(?:\s*/\s*\d+)?)(\s*)([a-zA-Z][a-zA-Z ./]*?)\s*(?:\*\*\s*[23])?$")
_UNITS = {
    "m", "cm", "mm", "km", "g", "kg", "mg", "lb", "lbs", "oz", "s", "sec", "min", "h", "hr", "hrs", "l", "ml",
    "in", "ft", "yd", "mi", "mph", "kph", "usd", "k",
}
_THOUSANDS = re.compile(r"(?<![\d.])(\d{1,3}(?:,\d{3})+)(?![\d])")
_WHITELIST = re.compile(r"^[0-9A-Za-z+\-*/().,=\s]*$")
_FUNCS = {"sqrt", "sin", "cos", "tan", "log", "ln", "exp", "pi", "oo"}


def _replace_group_command(text: str, command: str, render) -> str:
    """Rewrite every `command{a}{b}...` (arity = render's arity) using balanced braces; shorthand digits
    such as `\\frac12` count as groups."""
    arity = render.__code__.co_argcount
    out, i = [], 0
    while True:
        j = text.find(command, i)
        if j < 0:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:j])
        k, args = j + len(command), []
        while len(args) < arity:
            while k < len(text) and text[k] == " ":
                k += 1
            if k < len(text) and text[k] == "{":
                group = _balanced(text, k)
                if group is None:
                    raise ValueError("unbalanced braces")
                args.append(group[0])
                k = group[1]
            elif k < len(text) and (text[k].isalnum()):
                args.append(text[k])
                k += 1
            else:
                raise ValueError(f"malformed {command}")
        out.append(render(*[_latex_to_plain(a) for a in args]))
        i = k


def _latex_to_plain(text: str) -> str:
    for cmd in (r"\dfrac", r"\tfrac", r"\frac"):
        text = _replace_group_command(text, cmd, lambda a, b: f"(({a})/({b}))")
    # \sqrt[n]{x} before \sqrt{x}
    while True:
        m = re.search(r"\\sqrt\s*\[([^\]]*)\]", text)
        if not m:
            break
        rest = text[m.end():]
        group = _balanced(rest, 0) if rest.startswith("{") else None
        if group is None:
            raise ValueError("malformed \\sqrt[n]")
        text = text[: m.start()] + f"(({_latex_to_plain(group[0])})**(1/({m.group(1)})))" + rest[group[1]:]
    text = _replace_group_command(text, r"\sqrt", lambda a: f"sqrt({a})")
    for k, v in _SIMPLE_LATEX.items():
        text = text.replace(k, v)
    return text.replace("{", "(").replace("}", ")").replace("^", "**")


def _strip_units(s: str) -> str:
    """`12 cm`, `5 dollars`, `3 m/s`, `4cm^2` -> the number; `2x`, `2 pi`, `3 sqrt(2)` are kept."""
    m = _UNIT_TAIL.match(s)
    if not m:
        return s
    words = [w for w in re.split(r"[\s./]+", m.group(3)) if w]
    if not words or any(w in _FUNCS for w in words):
        return s
    spaced = bool(m.group(2))
    if all(w.lower() in _UNITS or (spaced and len(w) >= 2) for w in words):
        return m.group(1)
    return s


def normalize_answer(answer: str) -> str:
    """A canonical plain-text form of a short answer: LaTeX wrappers, units, currency, thousands separators
    and trailing punctuation removed. Raises ValueError on malformed LaTeX."""
    s = answer.strip()
    for d in _DROP:
        s = s.replace(d, " " if d in (r"\ ", "~", r"\quad", r"\qquad") else "")
    # \text{...} and friends: unwrap (units after a number are stripped below)
    while True:
        m = _TEXT_CMDS.search(s)
        if not m:
            break
        group = _balanced(s, m.end() - 1)
        if group is None:
            raise ValueError("unbalanced braces")
        s = s[: m.start()] + " " + group[0] + " " + s[group[1]:]
    s = _latex_to_plain(s)
    s = _THOUSANDS.sub(lambda m: m.group(1).replace(",", ""), s)
    s = s.strip().rstrip(".").strip()
    # "x = 5" / "y=2+3=5": the value is the last side
    if "=" in s:
        s = s.rsplit("=", 1)[1].strip()
    s = _strip_units(s)
    s = re.sub(r"\s+", " ", s).strip()
    if s.startswith("(") and s.endswith(")") and len(s) == 3:  # multiple choice "(B)"
        s = s[1]
    return s


# ---------------------------------------------------------------------------------------------------------
# Safe parsing: whitelist -> tokens -> ast with caps (the parent validates; the child builds sympy)
# ---------------------------------------------------------------------------------------------------------

MAX_NODES = 200
MAX_DEPTH = 40
MAX_INT_DIGITS = 60
MAX_EXPONENT = 1000

_TOKEN = re.compile(r"\s*(?:(\d+\.\d*|\.\d+|\d+)|([A-Za-z]+)|(\*\*|[+\-*/(),]))")


class UnsafeExpression(AlignError, ValueError):
    """An answer string outside the safe grammar."""


def to_python_syntax(expr: str) -> str:
    """Whitelisted plain math -> Python expression syntax with explicit multiplication:
    `2x` -> `2*x`, `2sqrt(3)` -> `2*sqrt(3)`, `ab` -> `a*b`, `(a)(b)` -> `(a)*(b)`."""
    if len(expr) > MAX_ANSWER_CHARS:
        raise UnsafeExpression(f"answer longer than {MAX_ANSWER_CHARS} characters")
    if not _WHITELIST.match(expr):
        raise UnsafeExpression("answer has characters outside the math whitelist")
    tokens, pos = [], 0
    stripped = expr.rstrip()
    while pos < len(stripped):
        m = _TOKEN.match(stripped, pos)
        if not m:
            raise UnsafeExpression(f"unexpected character at {pos}")
        num, name, op = m.groups()
        if name is not None:
            # split unknown multi-letter names into single-letter symbols (a product), keep known functions
            parts, rest = [], name
            while rest:
                for f in sorted(_FUNCS, key=len, reverse=True):
                    if rest.startswith(f):
                        parts.append(f)
                        rest = rest[len(f):]
                        break
                else:
                    parts.append(rest[0])
                    rest = rest[1:]
            tokens.extend(("name", p) for p in parts)
        elif num is not None:
            tokens.append(("num", num))
        else:
            tokens.append(("op", op))
        pos = m.end()
    out, prev = [], None
    for kind, text in tokens:
        operand_start = kind in ("num", "name") or text == "("
        prev_operand_end = prev is not None and (prev[0] == "num" or prev[1] == ")" or
                                                 (prev[0] == "name" and prev[1] not in _FUNCS - {"pi", "oo"}))
        if operand_start and prev_operand_end:
            out.append("*")
        out.append(text)
        prev = (kind, text)
    return " ".join(out)


_ALLOWED_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)


def _const_value(node: ast.AST) -> Fraction | None:
    """The exact value of a numbers-only subtree (+ - * / and unary signs), else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return Fraction(node.value) if isinstance(node.value, int) else Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp):
        v = _const_value(node.operand)
        return None if v is None else (-v if isinstance(node.op, ast.USub) else v)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        a, b = _const_value(node.left), _const_value(node.right)
        if a is None or b is None:
            return None
        if isinstance(node.op, ast.Div):
            return None if b == 0 else a / b
        return a + b if isinstance(node.op, ast.Add) else a - b if isinstance(node.op, ast.Sub) else a * b
    return None


def validate_ast(tree: ast.AST) -> None:
    """Raise UnsafeExpression unless `tree` is inside the small math grammar and its caps."""
    count = 0

    def visit(node: ast.AST, depth: int) -> None:
        nonlocal count
        count += 1
        if count > MAX_NODES or depth > MAX_DEPTH:
            raise UnsafeExpression("answer expression too large")
        if isinstance(node, ast.Expression):
            visit(node.body, depth + 1)
        elif isinstance(node, ast.Constant):
            if not isinstance(node.value, (int, float)) or isinstance(node.value, bool):
                raise UnsafeExpression("only numbers are allowed as constants")
            if isinstance(node.value, int) and len(str(abs(node.value))) > MAX_INT_DIGITS:
                raise UnsafeExpression("number too large")
        elif isinstance(node, ast.Name):
            if len(node.id) != 1 and node.id not in ("pi", "oo"):
                raise UnsafeExpression(f"unknown name {node.id!r}")
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, (ast.USub, ast.UAdd)):
                raise UnsafeExpression("unsupported operator")
            visit(node.operand, depth + 1)
        elif isinstance(node, ast.BinOp):
            if not isinstance(node.op, _ALLOWED_BINOPS):
                raise UnsafeExpression("unsupported operator")
            if isinstance(node.op, ast.Pow):
                exponent = _const_value(node.right)
                if exponent is None:
                    if any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.Pow) for n in ast.walk(node.right)):
                        raise UnsafeExpression("power towers are not allowed")
                elif abs(exponent) > MAX_EXPONENT:
                    raise UnsafeExpression(f"exponent above {MAX_EXPONENT}")
            visit(node.left, depth + 1)
            visit(node.right, depth + 1)
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCS - {"pi", "oo"} or node.keywords \
                    or not 1 <= len(node.args) <= 2:
                raise UnsafeExpression("unsupported function call")
            for a in node.args:
                visit(a, depth + 1)
        elif isinstance(node, ast.Tuple):
            if len(node.elts) > 10:
                raise UnsafeExpression("too many elements")
            for e in node.elts:
                visit(e, depth + 1)
        else:
            raise UnsafeExpression(f"unsupported syntax {type(node).__name__}")

    visit(tree, 0)


def parse_safe(expr: str) -> tuple[str, ast.Expression]:
    """(python-syntax string, validated ast) for a normalised answer; raises UnsafeExpression / SyntaxError."""
    code = to_python_syntax(expr)
    if not code.strip():
        raise UnsafeExpression("empty answer")
    tree = ast.parse(code, mode="eval")
    validate_ast(tree)
    return code, tree


def exact_number(tree: ast.Expression) -> Fraction | None:
    """The exact rational value of a numbers-only answer (`3`, `-0.5`, `7/2`), else None."""
    return _const_value(tree.body)


def _numbers_close(a: Fraction, b: Fraction, rel_tol: float) -> bool:
    return a == b or abs(float(a) - float(b)) <= rel_tol * max(abs(float(a)), abs(float(b)))


# ---------------------------------------------------------------------------------------------------------
# The sympy child: builds sympy objects from validated asts and checks equivalence; killed on timeout
# ---------------------------------------------------------------------------------------------------------


def _ast_to_sympy(node: ast.AST, sp) -> Any:
    if isinstance(node, ast.Expression):
        return _ast_to_sympy(node.body, sp)
    if isinstance(node, ast.Constant):
        return sp.Integer(node.value) if isinstance(node.value, int) else sp.Rational(str(node.value))
    if isinstance(node, ast.Name):
        return {"pi": sp.pi, "oo": sp.oo}.get(node.id) or sp.Symbol(node.id)
    if isinstance(node, ast.UnaryOp):
        v = _ast_to_sympy(node.operand, sp)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp):
        a, b = _ast_to_sympy(node.left, sp), _ast_to_sympy(node.right, sp)
        op = type(node.op)
        return {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
                ast.Div: lambda: a / b, ast.Pow: lambda: a ** b}[op]()
    if isinstance(node, ast.Call):
        args = [_ast_to_sympy(a, sp) for a in node.args]
        fn = {"sqrt": sp.sqrt, "sin": sp.sin, "cos": sp.cos, "tan": sp.tan, "log": sp.log, "ln": sp.log,
              "exp": sp.exp}[node.func.id]
        return fn(*args)
    if isinstance(node, ast.Tuple):
        return tuple(_ast_to_sympy(e, sp) for e in node.elts)
    raise UnsafeExpression(f"unsupported syntax {type(node).__name__}")


def _sympy_equal(a, b, sp, rel_tol: float) -> bool:
    if isinstance(a, tuple) or isinstance(b, tuple):
        if not (isinstance(a, tuple) and isinstance(b, tuple)) or len(a) != len(b):
            return False
        return all(_sympy_equal(x, y, sp, rel_tol) for x, y in zip(a, b))
    diff = sp.simplify(a - b)
    if diff == 0:
        return True
    if diff.is_number:
        try:
            va, vb = complex(sp.N(a, 30)), complex(sp.N(b, 30))
        except (TypeError, ValueError):
            return False
        return abs(va - vb) <= rel_tol * max(abs(va), abs(vb), 1e-300)
    return False


def equivalent_in_process(pred_code: str, gold_code: str, rel_tol: float = 1e-6, unordered: bool = False) -> bool:
    """Sympy equivalence of two validated python-syntax strings. Runs in the child; never call it on
    unvalidated text."""
    import sympy as sp

    a_tree, b_tree = ast.parse(pred_code, mode="eval"), ast.parse(gold_code, mode="eval")
    validate_ast(a_tree)
    validate_ast(b_tree)
    a, b = _ast_to_sympy(a_tree, sp), _ast_to_sympy(b_tree, sp)
    if unordered and isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        remaining = list(b)
        for x in a:
            for k, y in enumerate(remaining):
                if _sympy_equal(x, y, sp, rel_tol):
                    del remaining[k]
                    break
            else:
                return False
        return True
    return _sympy_equal(a, b, sp, rel_tol)


def _child_main(memory_mb: int) -> None:
    """The sympy child: JSON lines on stdin -> JSON lines on stdout ("ready" first)."""
    import json
    import resource
    import sys

    import sympy  # noqa: F401  (imported before the address-space cap)

    if memory_mb:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    channel, sys.stdout = sys.stdout, sys.stderr  # stray prints must not corrupt the protocol

    def reply(status: str, value: Any) -> None:
        channel.write(json.dumps([status, value]) + "\n")
        channel.flush()

    reply("ready", None)
    for line in sys.stdin:
        try:
            pred_code, gold_code, rel_tol, unordered = json.loads(line)
            reply("ok", bool(equivalent_in_process(pred_code, gold_code, rel_tol, unordered)))
        except MemoryError:
            reply("error", "sympy ran out of memory")
        except Exception as err:  # noqa: BLE001 - any failure of the check is reported, not raised here
            reply("error", f"{type(err).__name__}: {err}"[:300])


class SympyChild:
    """A persistent sympy process answering equivalence queries; killed and restarted when a check hangs.

    A plain subprocess (`python -c ...`), not multiprocessing: spawn / forkserver re-import the parent's
    `__main__`, which would re-run a user's unguarded training script inside the checker, and fork is unsafe
    in the threaded parents this runs in (the reward service, Ray workers).
    """

    def __init__(self, timeout_s: float = 5.0, start_timeout_s: float = 120.0, memory_mb: int = 2048):
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self.memory_mb = memory_mb
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def _start(self) -> None:
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        code = f"from rewards.verifiers import _child_main; _child_main({int(self.memory_mb)})"
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, bufsize=1, env=env, start_new_session=True)
        self._proc = proc
        status, _ = self._read(self.start_timeout_s) or (None, None)
        if status != "ready":
            self._kill()
            raise TimeoutError(f"the sympy checker did not start within {self.start_timeout_s:g}s")

    def _read(self, timeout_s: float) -> tuple[str, Any] | None:
        """One reply line, or None on timeout / a dead child."""
        stdout = self._proc.stdout
        ready, _, _ = select.select([stdout], [], [], timeout_s)
        if not ready:
            return None
        line = stdout.readline()
        if not line:
            return None
        return tuple(json.loads(line))

    def _kill(self) -> None:
        if self._proc is not None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)  # its own session: nothing it started survives
            except (ProcessLookupError, PermissionError):
                pass
            self._proc.wait(5)
            for stream in (self._proc.stdin, self._proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
        self._proc = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def check(self, pred_code: str, gold_code: str, rel_tol: float, unordered: bool) -> tuple[bool | None, str | None]:
        """(equal, None) or (None, error message)."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._kill()
                self._start()
            try:
                self._proc.stdin.write(json.dumps([pred_code, gold_code, rel_tol, unordered]) + "\n")
                self._proc.stdin.flush()
            except (BrokenPipeError, OSError) as err:
                self._kill()
                return None, f"sympy checker died: {type(err).__name__}"
            answer = self._read(self.timeout_s)
            if answer is None:
                died = self._proc.poll() is not None
                self._kill()
                return None, ("sympy checker died during the check" if died
                              else f"sympy equivalence check timed out after {self.timeout_s:g}s")
            status, value = answer
            return (bool(value), None) if status == "ok" else (None, f"sympy check failed: {value}")

    def close(self) -> None:
        with self._lock:
            self._kill()


# ---------------------------------------------------------------------------------------------------------
# Reward functions
# ---------------------------------------------------------------------------------------------------------


def _column(columns: dict[str, Any], names: Sequence[str], n: int, reward: str) -> list[Any]:
    for name in names:
        if name in columns and columns[name] is not None:
            values = list(columns[name])
            if len(values) != n:
                raise ValueError(f"{reward}: column {name!r} has {len(values)} values for {n} completions")
            return values
    raise ValueError(f"{reward} needs a {' / '.join(repr(x) for x in names)} column with the reference answers; "
                     "add it to the dataset (or pass label_column=...)")


def _completion_text(c: Any) -> str:
    """Plain text of a completion; conversational completions (lists of messages) give the last content."""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and c and isinstance(c[-1], dict):
        return str(c[-1].get("content", ""))
    if isinstance(c, dict):
        return str(c.get("content", ""))
    return "" if c is None else str(c)


@dataclass
class _Parsed:
    text: str  # normalised text
    code: str | None = None
    tree: ast.Expression | None = None
    problem: str | None = None


def _parse_answer(answer: str) -> _Parsed:
    if len(answer) > 4 * MAX_ANSWER_CHARS:
        return _Parsed(text=answer.strip(), problem=f"answer longer than {4 * MAX_ANSWER_CHARS} characters")
    try:
        text = normalize_answer(answer)
    except (ValueError, RecursionError) as err:
        return _Parsed(text=answer.strip(), problem=str(err))
    try:
        code, tree = parse_safe(text)
        return _Parsed(text=text, code=code, tree=tree)
    except (UnsafeExpression, SyntaxError, ValueError, RecursionError, MemoryError) as err:
        return _Parsed(text=text, problem=f"{type(err).__name__}: {err}"[:200])


class MathVerify(RewardFunction):
    """1.0 when the completion's final answer equals the reference answer, else 0.0.

    The final answer is the last `\\boxed{}`, else `#### X`, else `answer is X` (else the last number when
    `last_number=True`); the reference is the `label` / `answer` / `ground_truth` column (a GSM8K-style
    solution ending in `#### X` is reduced to X). Equality: normalised strings, else exact / relative
    (`rel_tol`) numeric equality, else sympy `simplify(a - b) == 0` in a killable child under `timeout_s`.

    Errors (no score): unparseable reference, a timed-out or crashed check. No extractable answer: 0.0 with
    info {"reason": "no answer"}.
    """

    name = "math_verify"

    def __init__(self, timeout_s: float = 5.0, rel_tol: float = 1e-6, last_number: bool = False,
                 label_column: str | None = None, correct_score: float = 1.0, wrong_score: float = 0.0,
                 memory_mb: int = 2048):
        if timeout_s <= 0:
            raise ValueError(f"math_verify: timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.rel_tol = rel_tol
        self.last_number = last_number
        self.label_columns = (label_column,) if label_column else ("label", "answer", "ground_truth")
        self.correct_score = correct_score
        self.wrong_score = wrong_score
        self.memory_mb = memory_mb
        self._child: SympyChild | None = None

    # pickles without its child process (Ray actors start their own)
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_child"] = None
        return state

    @property
    def child(self) -> SympyChild:
        if self._child is None:
            self._child = SympyChild(timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        return self._child

    def verify(self, completion: str, label: Any) -> tuple[float | None, str | None, dict[str, Any]]:
        """(score, error, info) for one sample."""
        if label is None or (isinstance(label, float) and math.isnan(label)):
            return None, "no reference answer for this sample", {}
        label_text = str(label)
        gold_raw = extract_answer(label_text) if ("####" in label_text or "\\boxed" in label_text) else label_text
        gold_raw = (gold_raw or "").strip()
        pred_raw = extract_answer(completion, last_number=self.last_number)
        if pred_raw is None:
            return self.wrong_score, None, {"reason": "no answer"}
        info: dict[str, Any] = {"answer": pred_raw[:MAX_ANSWER_CHARS], "reference": gold_raw[:MAX_ANSWER_CHARS]}
        gold, pred = _parse_answer(gold_raw), _parse_answer(pred_raw)
        if gold.text and gold.text == pred.text:
            return self.correct_score, None, {**info, "reason": "match", "method": "string"}
        if gold.problem is not None:
            return None, f"could not parse the reference answer ({gold.problem})", info
        if pred.problem is not None:
            return self.wrong_score, None, {**info, "reason": "unparseable answer"}
        a, b = exact_number(pred.tree), exact_number(gold.tree)
        if a is not None and b is not None:
            ok = _numbers_close(a, b, self.rel_tol)
            return (self.correct_score if ok else self.wrong_score), None, {
                **info, "reason": "match" if ok else "mismatch", "method": "numeric"}
        unordered = "(" not in gold.text.strip()[:1] and isinstance(gold.tree.body, ast.Tuple)
        equal, err = self.child.check(pred.code, gold.code, self.rel_tol, unordered)
        if err is not None:
            return None, err, info
        return (self.correct_score if equal else self.wrong_score), None, {
            **info, "reason": "match" if equal else "mismatch", "method": "sympy"}

    def score(self, prompts, completions, **columns) -> RewardOutput:
        labels = _column(columns, self.label_columns, len(completions), self.name)
        results = [self.verify(_completion_text(c), y) for c, y in zip(completions, labels)]
        return RewardOutput(scores=[r[0] for r in results], errors=[r[1] for r in results],
                            info=[r[2] for r in results])

    def close(self) -> None:
        if self._child is not None:
            self._child.close()
            self._child = None


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
    """

    name = "code_tests"

    def __init__(self, timeout_s: float = 10.0, memory_mb: int = 512, partial_credit: bool = True,
                 require_block: bool = False, tests_column: str = "tests", max_workers: int = 2):
        if timeout_s <= 0:
            raise ValueError(f"code_tests: timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.partial_credit = partial_credit
        self.require_block = require_block
        self.tests_column = tests_column
        self.max_workers = max(1, int(max_workers))

    def verify(self, completion: str, tests: Any) -> tuple[float | None, str | None, dict[str, Any]]:
        try:
            from align.tools import run_code
        except ImportError:  # older tools builds export it from the sandbox module only
            from align.tools.sandbox import run_code

        if tests is None or (isinstance(tests, (list, tuple)) and not tests) or (isinstance(tests, str) and not tests.strip()):
            return None, "no tests for this sample", {}
        code = extract_code(completion)
        if code is None and not self.require_block:
            code = completion
        if code is None or not code.strip():
            return 0.0, None, {"reason": "no code"}
        test_list = [tests] if isinstance(tests, str) else [str(t) for t in tests]
        try:
            result = run_code(code, tests=test_list, timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        except Exception as err:  # noqa: BLE001 - the sandbox itself failed: infrastructure, not a wrong answer
            return None, f"sandbox failed: {type(err).__name__}: {err}"[:300], {}
        status = str(getattr(result, "status", "")).lower()
        passed, failed = int(getattr(result, "passed", 0) or 0), int(getattr(result, "failed", 0) or 0)
        info = {"status": status, "passed": passed, "failed": failed,
                "isolation": str(getattr(result, "isolation", ""))}
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


DEFAULT_FORMAT_PATTERN = r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$"


class FormatReward(RewardFunction):
    """`match_score` when the completion matches `pattern` (the `regex` module, with a timeout), else
    `miss_score`. mode: "search" (anywhere), "match" (at the start) or "fullmatch".

    A pattern that runs past `timeout_s` (catastrophic backtracking) is an error for that sample.
    Default pattern: `<think>...</think> <answer>...</answer>` (DeepSeek-R1 style).
    """

    name = "format"

    def __init__(self, pattern: str = DEFAULT_FORMAT_PATTERN, mode: str = "search", flags: str = "s",
                 match_score: float = 1.0, miss_score: float = 0.0, timeout_s: float = 1.0,
                 max_chars: int = 100_000):
        import regex

        if mode not in ("search", "match", "fullmatch"):
            raise ValueError(f"format: mode must be 'search', 'match' or 'fullmatch', got {mode!r}")
        unknown = set(flags) - set("imsx")
        if unknown:
            raise ValueError(f"format: unknown regex flags {''.join(sorted(unknown))!r}; use letters from 'imsx'")
        try:
            regex.compile(pattern)
        except regex.error as err:
            raise ValueError(f"format: invalid pattern {pattern!r}: {err}") from None
        self.pattern, self.mode, self.flags = pattern, mode, flags
        self.match_score, self.miss_score = float(match_score), float(miss_score)
        self.timeout_s, self.max_chars = timeout_s, max_chars
        self._compiled = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_compiled"] = None
        return state

    def _regex(self):
        if self._compiled is None:
            import regex

            flag_bits = 0
            for f in self.flags:
                flag_bits |= {"i": regex.IGNORECASE, "m": regex.MULTILINE, "s": regex.DOTALL, "x": regex.VERBOSE}[f]
            self._compiled = regex.compile(self.pattern, flag_bits)
        return self._compiled

    def verify(self, completion: str) -> tuple[float | None, str | None, dict[str, Any]]:
        if len(completion) > self.max_chars:
            return self.miss_score, None, {"reason": f"longer than {self.max_chars} characters"}
        try:
            found = getattr(self._regex(), self.mode)(completion, timeout=self.timeout_s)
        except TimeoutError:
            return None, f"format regex timed out after {self.timeout_s:g}s", {}
        return (self.match_score, None, {"reason": "match"}) if found else (self.miss_score, None, {"reason": "no match"})

    def score(self, prompts, completions, **columns) -> RewardOutput:
        results = [self.verify(_completion_text(c)) for c in completions]
        return RewardOutput(scores=[r[0] for r in results], errors=[r[1] for r in results],
                            info=[r[2] for r in results])


__all__ = ["MathVerify", "CodeTests", "FormatReward", "extract_answer", "extract_boxed", "extract_code",
           "normalize_answer", "parse_safe", "SympyChild", "UnsafeExpression", "DEFAULT_FORMAT_PATTERN"]
