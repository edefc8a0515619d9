"""The calculator tool: safe arithmetic in a killable child with a deadline, plus Themis's GSM8K verdicts.

`Calculator()(text)`: plain arithmetic ("3/4*2.40" -> "1.8") or, when the input holds GSM8K annotations
('<<40*4=160>>160, ...'), Themis's verdict string ("Both the calculation and the answer are correct.", ...)
against the reference answer found in `context` (see `reference_from_context`).
"""
from __future__ import annotations

import json
import os
import queue
import select
import signal
import subprocess
import threading
import time
from dataclasses import asdict

from align.tools._child import python_module_argv
from align.tools.base import Tool, ToolError
from align.tools.calc_eval import CalcLimits, final_answer_text, reference_number

_WORKER_MODULE = "align.tools._calc_worker"  # run isolated: see _child.py


class _CalcChild:
    def __init__(self, memory_mb: int):
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "ALIGN_CALC_MEMORY_MB": str(memory_mb),
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(python_module_argv(_WORKER_MODULE), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                     start_new_session=True, close_fds=True)
        self.buf = b""
        if not self.read_line(30.0).get("ready"):
            raise RuntimeError("calculator worker did not start")

    def read_line(self, timeout: float) -> dict:
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError("calculator worker exited")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def call(self, req: dict, timeout: float) -> dict:
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        return self.read_line(timeout)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except Exception:
            pass
        for s in (self.proc.stdin, self.proc.stdout):
            try:
                s.close()
            except Exception:
                pass


class CalculatorPool:
    """Warm calculator children; a call past its deadline kills its child (a fresh one starts next time)."""

    def __init__(self, workers: int = 2, memory_mb: int = 1024):
        self.memory_mb = memory_mb
        self._idle: queue.Queue = queue.Queue()
        for _ in range(workers):
            self._idle.put(None)

    def call(self, req: dict, timeout_s: float) -> dict:
        child = self._idle.get()
        try:
            if child is None:
                child = _CalcChild(self.memory_mb)
            return child.call(req, timeout_s)
        except TimeoutError:
            child.kill()
            child = None
            return {"ok": False, "error": f"timeout: calculation exceeded {timeout_s:g}s and was killed"}
        except Exception as exc:
            if child is not None:
                child.kill()
            child = None
            return {"ok": False, "error": f"calculator worker failed: {exc!r}"}
        finally:
            self._idle.put(child)

    def warm(self) -> None:
        """Start every child now (tests and benchmarks call this so timing excludes the sympy import)."""
        kids = [self._idle.get() for _ in range(self._idle.qsize())]
        for i, c in enumerate(kids):
            if c is None:
                kids[i] = _CalcChild(self.memory_mb)
        for c in kids:
            self._idle.put(c)

    def close(self) -> None:
        while not self._idle.empty():
            c = self._idle.get_nowait()
            if c is not None:
                c.kill()


_pools: dict[tuple[int, int], CalculatorPool] = {}
_pools_lock = threading.Lock()


def get_calculator_pool(workers: int = 2, memory_mb: int = 1024) -> CalculatorPool:
    with _pools_lock:
        key = (workers, memory_mb)
        if key not in _pools:
            _pools[key] = CalculatorPool(workers, memory_mb)
        return _pools[key]


REFERENCE_KEYS = ("reference_answer", "ground_truth", "gold_answer")


def reference_from_context(context: dict, annotations: str, mode: str = "numeric") -> float | None:
    """The answer Themis's calculator compares the last computed value with, from the sample:

    `reference_answer` / `ground_truth` / `gold_answer` (a number or a '#### N' text); else, for a TARA item, the
    `#### N` of its `pos_answer` (the GSM8K gold); else the `#### N` of `answer` (the answer being judged).
    """
    for key in REFERENCE_KEYS:
        if context.get(key) is not None:
            v = context[key]
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
            text = str(v)
            return reference_number(final_answer_text(text) or text, mode)
    pos = context.get("pos_answer")
    if isinstance(pos, dict) and isinstance(pos.get("answer"), str):
        return reference_number(final_answer_text(pos["answer"]), mode)
    if isinstance(context.get("answer"), str):
        return reference_number(final_answer_text(context["answer"]), mode)
    return None


class Calculator(Tool):
    """Safe calculator. reference_parse="themis" reproduces TARA's digits-only reading of '#### 9.00'."""

    name = "calculator"
    description = "Evaluates arithmetic, or checks GSM8K '<<expr=value>>' annotations and the final '#### N'."

    def __init__(self, timeout_s: float = 2.0, workers: int = 2, memory_mb: int = 1024,
                 reference_parse: str = "numeric", limits: CalcLimits | None = None):
        if reference_parse not in ("numeric", "themis"):
            raise ValueError(f"Calculator.reference_parse={reference_parse!r}; use 'numeric' or 'themis'")
        if not timeout_s > 0:
            raise ValueError(f"Calculator.timeout_s must be > 0, got {timeout_s}")
        self.timeout_s, self.workers, self.memory_mb = timeout_s, workers, memory_mb
        self.reference_parse = reference_parse
        self.limits = limits or CalcLimits()

    def _pool(self) -> CalculatorPool:
        return get_calculator_pool(self.workers, self.memory_mb)

    def run(self, input: str, context: dict) -> str:
        limits = asdict(self.limits)
        if "<<" in input or ">>" in input or (not input.strip() and bool(context)):  # GSM8K / Themis mode
            ref = reference_from_context(context, input, self.reference_parse)
            req = {"op": "themis", "input": input[: 20 * limits["max_chars"]], "reference": ref, "limits": limits}
        else:
            req = {"op": "eval", "input": input, "backend": "sympy", "limits": limits}
        resp = self._pool().call(req, self.timeout_s)
        if not resp.get("ok"):
            raise ToolError(resp.get("error", "calculation failed"))
        return resp["output"]


def calculate(expr: str, timeout_s: float = 2.0) -> str:
    """Evaluate one arithmetic expression in the killable child; raises ToolError."""
    res = Calculator(timeout_s=timeout_s)(expr)
    if not res.ok:
        raise ToolError(res.error)
    return res.output


__all__ = ["Calculator", "CalculatorPool", "calculate", "get_calculator_pool", "reference_from_context"]
