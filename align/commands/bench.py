"""`align bench NAME [ARGS...]`: run one of the benchmark scripts in benchmarks/ (a source checkout)."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from align.errors import UserError

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def available() -> list[str]:
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.name.startswith("_")) if BENCH_DIR.is_dir() else []


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark script (kernels, rollout, e2e_vs_trl, tools, reward_service, ...)")
    p.add_argument("name", help="benchmark name: the script benchmarks/NAME.py")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script (e.g. --out file.json)")
    p.set_defaults(func=run)


def run(args) -> int:
    names = available()
    if not names:
        raise UserError(f"no benchmarks found at {BENCH_DIR}; `align bench` runs from a source checkout of align")
    if args.name not in names:
        from align.tools.registry import suggest

        raise UserError(f"unknown benchmark {args.name!r}{suggest(args.name, names)} (available: {', '.join(names)})")
    return subprocess.call([sys.executable, str(BENCH_DIR / f"{args.name}.py"), *args.args], cwd=BENCH_DIR.parent)
