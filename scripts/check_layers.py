"""Layer check: the dependency direction of DESIGN.md, read from every import statement (lazy ones included).

    align core (config, trainer, backends, CLI, ...) -> align.rollouts, align.rewards -> align.tools, align.kernels

- align.kernels imports only torch / triton (and the standard library) and itself;
- align.tools imports nothing of align but align.errors;
- align.rollouts may import align.kernels; align.rewards may import align.tools, align.kernels and
  align.rollouts (a generative reward model such as Themis generates its traces with the rollout engine), never
  the reverse;
- align.algos (pure RL math) imports only torch; like align.errors it is a leaf every layer above tools /
  kernels may use (curiosity's masked statistics, the LR schedule);
- align.errors imports nothing at all (every layer may import it); align._bare_names (the hand-over each
  sub-package's __init__ does when a checkout imports it by its bare name) imports only the standard library.

import-linter cannot see sub-packages installed from sibling folders through setuptools `package-dir`, so this
walks the AST. `python scripts/check_layers.py [REPO]` prints one line per violation and exits 1 if any.
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

# package -> folder in the repo
FOLDERS = {"align.kernels": "kernels", "align.tools": "tools", "align.rewards": "rewards",
           "align.rollouts": "rollouts", "align.algos": "align/algos", "align.errors": "align/errors.py",
           "align._bare_names": "align/_bare_names.py"}
# package -> the packages of ours it may import (itself always)
_LEAF = {"align._bare_names"}
ALLOWED_OURS = {
    "align.kernels": _LEAF,
    "align.tools": {"align.errors", *_LEAF},
    "align.rollouts": {"align.errors", "align.kernels", "align.algos", *_LEAF},
    "align.rewards": {"align.errors", "align.tools", "align.kernels", "align.algos", "align.rollouts", *_LEAF},
    "align.algos": {"align.errors"},
    "align.errors": set(),
    "align._bare_names": set(),
}
# package -> third-party import names it may use (None = any)
ALLOWED_THIRD_PARTY: dict[str, set[str] | None] = {
    "align.kernels": {"torch", "triton", "numpy"},
    "align.algos": {"torch"},
    "align.errors": set(),
    "align._bare_names": set(),
}
OUR_PACKAGES = ("align.kernels", "align.tools", "align.rewards", "align.rollouts", "align.algos", "align.errors",
                "align._bare_names")


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    layer: str
    imported: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.layer} must not import {self.imported}"


def _imported_names(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "align":  # `from align import tools` imports align.tools
                for alias in node.names:
                    yield node.lineno, f"align.{alias.name}"
            else:
                yield node.lineno, node.module


def _our_package(name: str) -> str:
    """align.tools.sandbox -> align.tools; align.config -> align.config (core); align -> align."""
    for pkg in OUR_PACKAGES:
        if name == pkg or name.startswith(pkg + "."):
            return pkg
    return name if name == "align" else ".".join(name.split(".")[:2])


def check(repo: Path) -> list[Violation]:
    out: list[Violation] = []
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for layer, folder in FOLDERS.items():
        root = repo / folder
        files = [root] if root.suffix == ".py" else sorted(root.rglob("*.py"))
        for path in files:
            tree = ast.parse(path.read_text(), filename=str(path))
            for line, name in _imported_names(tree):
                top = name.split(".")[0]
                rel = str(path.relative_to(repo))
                if top == "align":
                    pkg = _our_package(name)
                    if pkg != layer and pkg not in ALLOWED_OURS[layer]:
                        out.append(Violation(rel, line, layer, name))
                elif top in ("kernels", "tools", "rewards", "rollouts"):
                    out.append(Violation(rel, line, layer, f"{name} (the top-level name; use align.{name})"))
                elif top not in stdlib:
                    allowed = ALLOWED_THIRD_PARTY.get(layer)
                    if allowed is not None and top not in allowed:
                        out.append(Violation(rel, line, layer, name))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    repo = Path(argv[0]) if argv else Path(__file__).resolve().parents[1]
    violations = check(repo)
    for v in violations:
        print(v)
    print(f"layer check: {len(violations)} violation(s)")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
