"""`MathVerify`: the final answer equals the reference (strings, exact / relative numbers, else sympy in its child)."""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from typing import Any

from align.rewards.base import RewardFunction, RewardOutput
from align.rewards.verifiers.common import _column, _completion_text
from align.rewards.verifiers.math_parse import (
    MAX_ANSWER_CHARS,
    UnsafeExpression,
    _numbers_close,
    exact_number,
    extract_answer,
    normalize_answer,
    parse_safe,
)
from align.rewards.verifiers.sympy_child import SympyChild


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

    def required_columns(self) -> list[tuple[str, ...]]:
        return [tuple(self.label_columns)]

    def score(self, prompts, completions, **columns) -> RewardOutput:
        labels = _column(columns, self.label_columns, len(completions), self.name)
        results = [self.verify(_completion_text(c), y) for c, y in zip(completions, labels)]
        return RewardOutput(scores=[r[0] for r in results], errors=[r[1] for r in results],
                            info=[r[2] for r in results])

    def close(self) -> None:
        if self._child is not None:
            self._child.close()
            self._child = None
