"""Math answers without sympy: extraction (\\boxed, ####, "answer is"), normalisation (LaTeX -> plain) and safe
parsing (a character whitelist, then `ast` with caps on size, depth, integers and exponents)."""
from __future__ import annotations

import ast
import re
from fractions import Fraction

from align.errors import AlignError

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
