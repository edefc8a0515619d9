"""Backend selection and small helpers shared by the kernel modules (torch and triton only)."""

from __future__ import annotations

import importlib.util
import os

import torch

from align.kernels.health import check_triton

BACKENDS = ("auto", "triton", "torch")


def triton_interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1 before triton was imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, tensor: torch.Tensor, fn: str) -> str:
    """Map "auto" | "triton" | "torch" to the backend that will run for `tensor`.

    "auto" = Triton on CUDA tensors, the PyTorch reference elsewhere. "triton" on CPU tensors only works in
    the Triton interpreter (TRITON_INTERPRET=1 set before importing triton).
    """
    if backend not in BACKENDS:
        raise ValueError(f"{fn}: backend={backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    if backend == "auto":  # on CUDA only once the start-up probe launched a kernel there (align.kernels.health)
        return "triton" if (tensor.is_cuda and triton_available() and check_triton(tensor.device, False, fn)) else "torch"
    if not triton_available():
        raise RuntimeError(f"{fn}: backend='triton' needs the triton package; install it or use backend='torch'")
    if not tensor.is_cuda and not triton_interpreted():
        raise ValueError(
            f"{fn}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before importing triton to run "
            f"the kernels on the CPU); use backend='torch' or 'auto' for CPU tensors"
        )
    if tensor.is_cuda:
        check_triton(tensor.device, True, fn)  # one line naming the ptxas / driver fix if kernels cannot launch
    elif not _triton_lib_interpreted():
        raise RuntimeError(
            f"{fn}: TRITON_INTERPRET=1 was set after triton was imported, so triton's own library stayed compiled; "
            "set it in the environment (or at the very top of the root conftest.py) before anything imports triton"
        )
    return "triton"


def _triton_lib_interpreted() -> bool:
    """Whether triton.language's own @jit helpers were decorated in interpreter mode (decided at import)."""
    from triton.language import standard

    return type(standard.zeros).__name__ == "InterpretedFunction"


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
