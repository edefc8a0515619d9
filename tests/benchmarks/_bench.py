"""Load a script of benchmarks/ as a module (they are scripts, not a package)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(stem: str, name: str | None = None, on_path: bool = False):
    """benchmarks/<stem>.py as module `name` (default: the stem). on_path: the script imports its siblings by
    name (gpu_suite -> train_rows), so the folder goes on sys.path; off by default, and then only while the
    script runs its imports: a sibling's name (benchmarks/tools.py) would shadow a package's for what imports after."""
    added = on_path and str(BENCHMARKS) not in sys.path
    if added:
        sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name or stem, BENCHMARKS / f"{stem}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    finally:
        if added:
            sys.path.remove(str(BENCHMARKS))
    return module
