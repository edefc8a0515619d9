"""Command lines for Python child processes that import align (the calculator worker, the sympy checker).

The child runs in isolated mode (`python -I`): no working directory, script folder, PYTHONPATH or user site on
sys.path, so no top-level `tools` / `kernels` / ... (ours or a PyPI package's) can shadow what it imports. It
loads `align` from the very file the parent loaded, which works the same for an installed copy, an editable
install and a source checkout on PYTHONPATH (which -I would otherwise ignore); `align`'s own finder then maps
`align.tools` & co. to their folders. Nothing here imports torch.
"""
from __future__ import annotations

import os
import sys

_BOOT = ("import importlib.util as _u, sys as _s; "
         "_p = _u.spec_from_file_location('align', {init!r}, submodule_search_locations=[{folder!r}]); "
         "_m = _u.module_from_spec(_p); _s.modules['align'] = _m; _p.loader.exec_module(_m); del _u, _s, _p, _m\n")


def python_argv(code: str) -> list[str]:
    """argv running `code` in an isolated child interpreter where `import align...` finds this align."""
    init = sys.modules[__name__.partition(".")[0]].__file__
    return [sys.executable, "-I", "-c", _BOOT.format(init=init, folder=os.path.dirname(init)) + code]


def python_module_argv(module: str) -> list[str]:
    """argv running `python -I -m module` for a module of align."""
    return python_argv(f"import runpy; runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
