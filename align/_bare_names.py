"""A checkout's top-level `kernels/`, `tools/`, `rewards/` and `rollouts/` folders are `align.kernels` & co.
(pyproject's package-dir), but a process started in the checkout (`python -m align.cli`, `torchrun`, a script
with the repo root on PYTHONPATH) also finds them under their bare names, first on sys.path. transformers >= 5.25
imports Hugging Face's `kernels` package, and PyPI has `tools`, `rewards` and `rollouts`: without this hand-over
such an import would get our folder and fail (`cannot import name 'CUDAProperties' from 'kernels'`).

Each of the four `__init__.py` calls `hand_over` when its module is not named `align.*`: the installed package of
that name is loaded in its place (importlib returns what a module leaves in sys.modules under its name). Where none
is installed the name gets an empty placeholder, without `__file__` or `__version__`, as a namespace package would
be: transformers' availability probe imports `kernels` and reads both, so an ImportError there would break
`import transformers`; any other attribute raises AttributeError naming `from align import ...`."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types


def hand_over(name: str, init_file: str) -> None:
    """Replace sys.modules[name] (the bare import of our folder whose __init__ is `init_file`) with the package of
    that name found on sys.path outside the checkout, or with a placeholder when there is none."""
    root = os.path.realpath(os.path.dirname(os.path.dirname(init_file)))
    elsewhere = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
    if spec is None or spec.loader is None:
        sys.modules[name] = _placeholder(name)
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def _placeholder(name: str) -> types.ModuleType:
    module = types.ModuleType(name, f"No package {name!r} is installed; the checkout's {name}/ folder is align.{name}.")

    def __getattr__(attr: str):
        raise AttributeError(f"no package {name!r} is installed (this is the checkout's {name}/ folder, reached by "
                             f"its bare name): use `from align import {name}`")

    module.__getattr__ = __getattr__
    return module
