"""Rule verifiers: math answer equivalence (sympy), code correctness (sandboxed tests), format (regex).

Every verifier separates two outcomes that a silent 0.0 would conflate:
- a wrong (or missing) answer is the model's fault: score 0.0, with `info["reason"]` saying why;
- a check that could not decide (timeout, unparseable gold label, sandbox down) is an infrastructure
  failure: the sample gets an explicit error and no score, so it never reaches the advantages.

Math answers are never handed to `sympify`/`eval`: the extracted short answer is normalised (LaTeX -> plain),
checked against a strict character whitelist, parsed with `ast` and validated with caps on length, node
count, depth, integer size and exponents; sympy objects are only built in a killable child process, and each
equivalence check runs under a wall-clock timeout (sympy hangs have stalled RL jobs in verl and rllm).

Modules: `math_parse` (extraction, normalisation, safe parsing), `sympy_child` (the checker process),
`math_verify` (MathVerify), `code_tests` (CodeTests), `format` (FormatReward), `common` (column helpers).
Every public name is importable from here (`"align.rewards.verifiers:MathVerify"` in configs).
"""
from __future__ import annotations

from align.rewards.verifiers.code_tests import PROGRAM_STATUSES, CodeTests, extract_code
from align.rewards.verifiers.format import DEFAULT_FORMAT_PATTERN, FormatReward
from align.rewards.verifiers.math_parse import (
    MAX_ANSWER_CHARS,
    MAX_BOX_TRIES,
    MAX_DEPTH,
    MAX_EXPONENT,
    MAX_INT_DIGITS,
    MAX_NODES,
    MAX_SCAN_CHARS,
    UnsafeExpression,
    exact_number,
    extract_answer,
    extract_boxed,
    normalize_answer,
    parse_safe,
    to_python_syntax,
    validate_ast,
)
from align.rewards.verifiers.math_verify import MathVerify
from align.rewards.verifiers.sympy_child import SympyChild, equivalent_in_process

__all__ = ["MathVerify", "CodeTests", "FormatReward", "extract_answer", "extract_boxed", "extract_code",
           "normalize_answer", "parse_safe", "SympyChild", "UnsafeExpression", "DEFAULT_FORMAT_PATTERN",
           "PROGRAM_STATUSES", "MAX_ANSWER_CHARS", "MAX_BOX_TRIES", "MAX_DEPTH", "MAX_EXPONENT", "MAX_INT_DIGITS",
           "MAX_NODES", "MAX_SCAN_CHARS", "exact_number", "equivalent_in_process", "to_python_syntax", "validate_ast"]
