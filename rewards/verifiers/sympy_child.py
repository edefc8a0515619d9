"""The sympy checker: a persistent, killable child process that builds sympy objects from validated asts and
decides equivalence under a wall-clock timeout (sympy hangs have stalled RL jobs in verl and rllm)."""
from __future__ import annotations

import ast
import json
import os
import select
import signal
import subprocess
import threading
from typing import Any

from align.rewards.verifiers.math_parse import UnsafeExpression, validate_ast
from align.tools._child import python_argv

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
        # isolated (`python -I`, see align.tools._child): it loads this align, never a top-level `rewards`
        code = f"from align.rewards.verifiers.sympy_child import _child_main; _child_main({int(self.memory_mb)})"
        proc = subprocess.Popen(python_argv(code), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, bufsize=1, start_new_session=True)
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
