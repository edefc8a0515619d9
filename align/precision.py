"""Mixed precision: which dtype each model holds, and the autocast the trainer's forwards run under.

`model.dtype: auto` (the default) on CUDA is the usual mixed-precision recipe (TRL's and verl's GPU default):
- trained weights stay fp32 (AdamW's master copy: bf16 weights would round small updates away; with LoRA the
  frozen base is bf16 and only the fp32 adapters train),
- the trainer's forwards (policy, reference, critic) run under `torch.autocast("cuda", bfloat16)`, so GEMMs
  and attention use the bf16 tensor cores and flash attention; the log-prob kernels upcast to fp32, and the
  value head and losses stay fp32,
- TF32 is allowed for any fp32 matmul left (`torch.backends.cuda.matmul.fp32_precision = "tf32"`),
- the frozen reference copy is held in bf16 (it is never updated, so it needs no fp32 master: half the memory),
- decoding runs from a bf16 copy of the fp32 policy, refreshed in place after each update (`DecodeCopy`),
  so a decode step reads half the weight bytes and the captured CUDA graphs keep their addresses.
On CPU `auto` is plain fp32 (no autocast, no copies): CPU bf16 GEMMs are slow and the CPU runs are the exact
reference. `float32` is fp32 everywhere (IEEE matmuls); `bfloat16` holds the policy in bf16 (warned without
LoRA). A separately trained critic is always loaded in fp32 (run under the autocast): with `bfloat16` or LoRA
it was bf16 and trained by AdamW without master weights (F9 of the GPU readiness review). `float16` is
refused: training fp16 needs a GradScaler, which the trainer does not run.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from align.errors import ConfigError

_ATTR = "_align_autocast_dtype"  # set on a module by `mark_autocast`; read by `autocast_forward`


@dataclass(frozen=True)
class Precision:
    policy: torch.dtype  # the policy's load dtype (the trained fp32 master, or a LoRA run's frozen base)
    reference: torch.dtype  # the frozen reference copy (runs without LoRA only)
    critic: torch.dtype  # a separate critic's backbone: trained in full, so always fp32 masters
    autocast: torch.dtype | None  # the trainer forwards' autocast dtype on CUDA; None = off
    decode: torch.dtype | None  # dtype of a separate decode copy of the policy; None = decode the policy itself
    tf32: bool  # allow TF32 for fp32 matmuls


def resolve_precision(dtype: str, lora: bool, device: torch.device) -> Precision:
    """The dtypes and autocast for `model.dtype` = dtype on `device` (see the module docstring for why)."""
    cuda = device.type == "cuda"
    f32, bf16 = torch.float32, torch.bfloat16
    if dtype == "float16":
        raise ConfigError("model.dtype = float16 would train without a GradScaler (fp16 gradients underflow); "
                          "use model.dtype: auto (bf16 autocast on CUDA) or bfloat16")
    if dtype == "auto":
        if not cuda:
            return Precision(f32, f32, f32, None, None, False)
        return Precision(bf16 if lora else f32, bf16, f32, bf16, None if lora else bf16, True)
    if dtype == "bfloat16":
        return Precision(bf16, bf16, f32, bf16 if cuda else None, None, cuda)
    if dtype == "float32":
        return Precision(f32, f32, f32, None, None, False)
    raise ConfigError(f"model.dtype = {dtype!r} is unknown; use auto, float32 or bfloat16")


def apply_matmul_precision(precision: Precision) -> None:
    """Process-wide: TF32 for fp32 matmuls and cuDNN convolutions when the precision allows it."""
    if not precision.tf32:
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9: the new API (mixing it with allow_tf32 raises)
        matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def mark_autocast(module: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Record on `module` the autocast dtype its trainer forwards run under (None: none)."""
    object.__setattr__(module, _ATTR, dtype)  # a plain attribute: not a parameter, buffer or submodule
    return module


def autocast_dtype(module: Any) -> torch.dtype | None:
    return getattr(module, _ATTR, None)


@contextlib.contextmanager
def autocast_for(module: Any) -> Iterator[None]:
    """`torch.autocast` with the module's marked dtype on its parameters' device; nothing for unmarked modules
    (`resolve_precision` marks modules on CUDA only)."""
    dtype = autocast_dtype(module)
    if dtype is None:
        yield
        return
    param = next(iter(module.parameters()), None)
    with torch.autocast(device_type=param.device.type if param is not None else "cuda", dtype=dtype):
        yield


def autocast_forward(fn: Callable) -> Callable:
    """Decorate a function whose first argument is the model: it runs under that model's autocast."""

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with autocast_for(model):
            return fn(model, *args, **kwargs)

    return wrapper


class DecodeCopy:
    """A low-precision copy of the policy for the rollout engine, refreshed in place from the trained weights.

    In place (`copy_` into the same storage), so the engine's captured CUDA graphs, which hold raw parameter
    pointers, stay valid. Buffers (rotary tables) are copied once and kept in their own dtype.
    """

    def __init__(self, policy: nn.Module, dtype: torch.dtype):
        import copy

        self.source = policy
        self.model = copy.deepcopy(policy).eval()
        self.model.requires_grad_(False)
        for p in self.model.parameters():
            p.data = p.data.to(dtype)
        self.pairs = list(zip(self.model.parameters(), policy.parameters()))

    @torch.no_grad()
    def refresh(self) -> None:
        for dst, src in self.pairs:
            dst.copy_(src)
