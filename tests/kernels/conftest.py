"""Run the Triton kernels in the CPU interpreter when no GPU is present.

TRITON_INTERPRET is read when a @triton.jit function is decorated, so it must be set before triton is first
imported. This conftest sets it when the kernel tests are collected; if triton was imported earlier (for
example through another package's tests), triton's own library is already compiled and the Triton-backend
tests fail with a message saying so: then set TRITON_INTERPRET=1 at the top of the root tests/conftest.py.
Our kernel modules, if already imported, are reloaded in interpreter mode (same module objects).
"""

import importlib
import os
import sys

import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    os.environ["TRITON_INTERPRET"] = "1"
    for name in ("align.kernels.sampling", "align.kernels.logprobs"):
        if name in sys.modules:
            importlib.reload(sys.modules[name])
