"""Start-up check that Triton kernels can launch on a CUDA device (F7 of the GPU readiness review).

Triton compiles with its own bundled ptxas: for sm >= 90 recent releases ship a CUDA 13 ptxas
(`ptxas-blackwell`), whose cubins a CUDA 12 driver (< R580) may refuse at load time with "device kernel image
is invalid" (triton#3001, vllm#5713), and a ptxas that rejects the PTX fails the compile (PTXASError). Either
way every Triton kernel would fail at its first launch, i.e. generation would die on its first decode step.
So, once per device and process, before the first Triton launch on that device, one tiny kernel is compiled,
launched and its output checked. If that fails, backend="auto" falls back to the PyTorch reference with one
warning naming the fix, and an explicit backend="triton" raises one line naming it.
"""
from __future__ import annotations

import warnings

import torch

FIX = ("point Triton at the system CUDA's ptxas (TRITON_PTXAS_BLACKWELL_PATH=/usr/local/cuda/bin/ptxas for "
       "sm >= 90, TRITON_PTXAS_PATH for older GPUs) or update the NVIDIA driver")
_RESULT: dict[tuple[str, int], str | None] = {}  # (device type, index) -> None (launch works) or the error


def _probe(device: torch.device) -> None:
    """Compile and launch one tiny kernel on `device`; raise if it fails or writes wrong values."""
    import triton
    import triton.language as tl

    @triton.jit
    def _add_one(x_ptr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(x_ptr + i, tl.load(x_ptr + i) + 1.0)

    x = torch.arange(16, dtype=torch.float32, device=device)
    _add_one[(1,)](x, BLOCK=16)
    if not torch.equal(x.cpu(), torch.arange(1, 17, dtype=torch.float32)):
        raise RuntimeError("the probe kernel ran but wrote wrong values")


def launch_error(device: torch.device) -> str | None:
    """None when Triton kernels launch on `device` (checked once per device and process), else the error line."""
    key = (device.type, device.index if device.index is not None else torch.cuda.current_device())
    if key not in _RESULT:
        if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return None  # a first launch inside CUDA-graph capture: probing would sync; the capture itself will tell
        try:
            _probe(device)
            _RESULT[key] = None
        except Exception as err:  # noqa: BLE001 - any compile / load failure means the same: no Triton here
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            _RESULT[key] = f"{type(err).__name__}: {first}"
    return _RESULT[key]


def check_triton(device: torch.device, explicit: bool, fn: str) -> bool:
    """True when Triton may run on CUDA `device`. A failed probe: explicit -> RuntimeError (one line);
    auto -> one warning per device, False (the caller runs the PyTorch reference). A RuntimeError, like the
    dispatcher's other errors: align.kernels imports only torch and triton (no align.errors)."""
    err = launch_error(device)
    if err is None:
        return True
    where = f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    if explicit:
        raise RuntimeError(f"{fn}: backend='triton' but Triton kernels cannot launch on {where} ({err}); {FIX}, "
                                f"or use backend / sampler_backend 'torch'")
    if (device.type, where) not in _WARNED:
        _WARNED.add((device.type, where))
        warnings.warn(f"Triton kernels cannot launch on {where} ({err}): using the PyTorch reference kernels "
                      f"(slower); {FIX}", RuntimeWarning, stacklevel=3)
    return False


_WARNED: set[tuple[str, str]] = set()


def startup_backend(backend: str, device: torch.device, fn: str = "RolloutEngine") -> str:
    """A sampler backend setting checked at start-up: "auto" on a CUDA device where Triton cannot launch
    becomes "torch" (one warning), an explicit "triton" there raises; anything else is returned unchanged."""
    if device.type != "cuda" or backend == "torch":
        return backend
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return backend  # the dispatcher says what to install
    return backend if check_triton(device, backend == "triton", fn) else "torch"
