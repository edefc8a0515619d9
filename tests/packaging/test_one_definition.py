"""One definition each, read from the source tree's AST: the Themis special tokens and Action regex, the trace
step type, `tara_dir`, the position-id helper. A second copy anywhere in the shipped code or the examples fails.

(The config loader and LR schedule are checked elsewhere.)
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LIBRARY = ("align", "kernels", "tools", "rewards", "rollouts")
SOURCES = LIBRARY + ("examples", "scripts", "benchmarks")

THEMIS_TOKENS = ("<start_tool>", "<start_observation>", "<start_work>")
TRACE_MODULE = "tools/trace.py"          # align.tools.trace
TARA_DIR_MODULE = "tools/data.py"        # align.tools.data
POSITIONS_MODULE = "align/algos/positions.py"
ACTION_PATTERN = r"Action\s*\d*\s*:[\s]*(.*?)[\s]*Action\s*\d*\s*Input\s*\d*\s*:[\s]*(.*)"  # released Themis
REGEX_CALLS = {"compile", "search", "match", "fullmatch", "findall", "finditer", "sub", "subn", "split"}


def parse_tree(root: Path) -> list[tuple[str, ast.AST]]:
    """(path relative to root, AST) of every source file."""
    out = []
    for folder in SOURCES:
        for path in sorted((root / folder).rglob("*.py")):
            if "__pycache__" not in path.parts:
                out.append((path.relative_to(root).as_posix(), ast.parse(path.read_text(encoding="utf-8"))))
    return out


def _library(files):
    return [(rel, tree) for rel, tree in files if rel.split("/")[0] in LIBRARY]


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of string constants that are expression statements (docstrings, bare strings): prose, not code."""
    return {id(n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)}


def _code_strings(tree: ast.AST):
    prose = _docstrings(tree)
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in prose:
            yield n


def _regex_literals(tree: ast.AST):
    """String literals passed as the pattern of re.compile / re.search / ... ."""
    for n in ast.walk(tree):
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in REGEX_CALLS
                and isinstance(n.func.value, ast.Name) and n.func.value.id == "re" and n.args):
            for c in ast.walk(n.args[0]):
                if isinstance(c, ast.Constant) and isinstance(c.value, str):
                    yield n.lineno, c.value


def _is_cumsum_minus_one(n: ast.AST) -> bool:
    if not (isinstance(n, ast.BinOp) and isinstance(n.op, ast.Sub)):
        return False
    if not (isinstance(n.right, ast.Constant) and n.right.value == 1 and isinstance(n.left, ast.Call)):
        return False
    f = n.left.func
    return (isinstance(f, ast.Attribute) and f.attr == "cumsum") or (isinstance(f, ast.Name) and f.id == "cumsum")


def special_token_sites(files) -> dict[str, list[str]]:
    """token -> 'file:line' of every code (non-docstring) string literal holding it."""
    sites: dict[str, list[str]] = {t: [] for t in THEMIS_TOKENS}
    for rel, tree in files:
        for c in _code_strings(tree):
            for t in THEMIS_TOKENS:
                if t in c.value:
                    sites[t].append(f"{rel}:{c.lineno}")
    return sites


def action_regex_sites(files) -> list[tuple[str, str]]:
    """('file:line', pattern) of every regex literal that reads a Themis 'Action ... Input' request."""
    return [(f"{rel}:{line}", pat) for rel, tree in files for line, pat in _regex_literals(tree)
            if "Action" in pat and "Input" in pat]


def step_type_sites(files) -> list[str]:
    """Classes with annotated `action` and `action_input` fields (a trace step, whatever its name)."""
    out = []
    for rel, tree in files:
        for n in ast.walk(tree):
            if isinstance(n, ast.ClassDef):
                fields = {s.target.id for s in n.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
                if {"action", "action_input"} <= fields or n.name in ("ToolCall", "ToolStep"):
                    out.append(f"{rel}:{n.lineno}:{n.name}")
    return out


def function_sites(files, name: str) -> list[str]:
    return [f"{rel}:{n.lineno}" for rel, tree in files for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name]


def tara_env_sites(files) -> list[str]:
    """The ALIGN_TARA_DIR lookup key in the library (a second lookup is a second tara_dir)."""
    return [f"{rel}:{c.lineno}" for rel, tree in _library(files) for c in _code_strings(tree)
            if c.value == "ALIGN_TARA_DIR"]


def position_formula_sites(files) -> list[str]:
    """`<x>.cumsum(...) - 1` anywhere (the position-id formula), by file:line."""
    return [f"{rel}:{n.lineno}" for rel, tree in files for n in ast.walk(tree) if _is_cumsum_minus_one(n)]


def problems(root: Path) -> list[str]:
    return problems_in(parse_tree(root))


def problems_in(files: list[tuple[str, ast.AST]]) -> list[str]:
    out = []
    for token, sites in special_token_sites(files).items():
        if len(sites) != 1 or not sites[0].startswith(TRACE_MODULE + ":"):
            out.append(f"special token {token!r} must be written once, in {TRACE_MODULE}: {sites}")
    # every 'Action ... Input' regex lives in the trace module, and the Themis Action regex is written once
    regex = action_regex_sites(files)
    elsewhere = [site for site, _ in regex if not site.startswith(TRACE_MODULE + ":")]
    copies = [site for site, pat in regex if pat == ACTION_PATTERN]
    if elsewhere or len(copies) != 1:
        out.append(f"the Action regex must be defined once, in {TRACE_MODULE}: {[site for site, _ in regex]}")
    steps = step_type_sites(files)
    if steps != [s for s in steps if s.startswith(TRACE_MODULE + ":") and s.endswith(":ToolCall")] or len(steps) != 1:
        out.append(f"one trace step type (ToolCall in {TRACE_MODULE}): {steps}")
    tara = function_sites(files, "tara_dir")
    if len(tara) != 1 or not tara[0].startswith(TARA_DIR_MODULE + ":"):
        out.append(f"tara_dir must be defined once, in {TARA_DIR_MODULE}: {tara}")
    env = tara_env_sites(files)
    if len(env) != 1 or not env[0].startswith(TARA_DIR_MODULE + ":"):
        out.append(f"ALIGN_TARA_DIR must be read in one place, {TARA_DIR_MODULE}: {env}")
    pos = function_sites(files, "position_ids_from_mask")
    if len(pos) != 1 or not pos[0].startswith(POSITIONS_MODULE + ":"):
        out.append(f"position_ids_from_mask must be defined once, in {POSITIONS_MODULE}: {pos}")
    formula = position_formula_sites(files)
    if len(formula) != 1 or not formula[0].startswith(POSITIONS_MODULE + ":"):
        out.append(f"position ids (cumsum(-1) - 1) must be computed only in {POSITIONS_MODULE}: {formula}")
    return out


def test_one_definition_each():
    assert problems(REPO) == []


def test_the_definitions_are_the_ones_imported():
    from align.algos import position_ids_from_mask
    from align.rewards import tara, themis
    from align.tools import data, trace
    from align.trainer import forward

    assert tara.ToolCall is trace.ToolCall and tara.tara_dir is data.tara_dir
    assert themis.ACTION_RE is trace.ACTION_RE and themis.THEMIS_SPECIAL_TOKENS is trace.THEMIS_SPECIAL_TOKENS
    assert tara.START_OBSERVATION is trace.START_OBSERVATION and themis.parse_action is trace.parse_action_block
    assert forward.position_ids_from_mask is position_ids_from_mask
    assert trace.ACTION_RE.pattern == ACTION_PATTERN


@pytest.fixture(scope="module")
def repo_files():
    return parse_tree(REPO)


@pytest.mark.parametrize("file, code, expected", [
    ("rewards/themis.py", 'START_TOOL2 = "<start_tool>"', "special token '<start_tool>'"),
    ("examples/themis_tara.py", 'TOKENS = ("<pad>", "<start_work>")', "special token '<start_work>'"),
    ("rewards/tara.py", 'import re\nA_RE = re.compile(r"Action\\s*:(.*)Action Input:(.*)")', "the Action regex"),
    ("rewards/themis.py", "import re\nA_RE = re.compile(" + repr(ACTION_PATTERN) + ", re.DOTALL)", "the Action regex"),
    ("rewards/tara.py", "from dataclasses import dataclass\n@dataclass\nclass Step:\n    action: str\n    action_input: str",
     "one trace step type"),
    ("rewards/tara.py", "def tara_dir():\n    return None", "tara_dir must be defined once"),
    ("rewards/training.py", 'import os\nROOT = os.environ.get("ALIGN_TARA_DIR")', "ALIGN_TARA_DIR must be read"),
    ("rollouts/umm.py", "def position_ids_from_mask(m):\n    return m", "position_ids_from_mask must be defined once"),
    ("rewards/classifier.py", "def _pos(m):\n    return (m.cumsum(-1) - 1).clamp(min=0)", "position ids (cumsum(-1) - 1)"),
])
def test_a_second_copy_fails(repo_files, file, code, expected):
    # the tree with `code` appended to one file
    source = (REPO / file).read_text(encoding="utf-8") + "\n\n" + code + "\n"
    files = [(rel, ast.parse(source) if rel == file else tree) for rel, tree in repo_files]
    found = problems_in(files)
    assert len(found) == 1 and found[0].startswith(expected), found
