"""The preallocated tensors of one micro-batch's decode loop, and a captured CUDA graph over them.

The engine (`align.rollouts.engine`) fills a `_DecodeState` at prefill and every decode step reads and writes
it in place, which is what lets a CUDA graph replay the step; the sampler (`align.rollouts.sampler`) writes
its outputs into the same tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from align.rollouts.sampler import _Sampler


@dataclass
class _DecodeState:
    """Every tensor a decode step reads or writes, preallocated for one micro-batch (b rows, P prompt, T new)."""

    cache: Any  # transformers Cache
    bias: torch.Tensor  # [b, 1, 1, P + T] additive attention bias in the model dtype (0 = attend)
    tokens: torch.Tensor  # [b] next input token
    positions: torch.Tensor  # [b] its position id
    step: torch.Tensor  # [1] int64 decode step t of the token being sampled
    col: torch.Tensor  # [1] int64 cache column of the next input token (P + t - 1)
    finished: torch.Tensor  # [b] bool
    bad: torch.Tensor  # [b] bool: a row produced NaN/inf logits
    out_tokens: torch.Tensor  # [b, T]
    out_logp: torch.Tensor  # [b, T] fp32
    out_slp: torch.Tensor  # [b, T] fp32
    out_hit: torch.Tensor  # [b, T] bool
    out_live: torch.Tensor  # [b, T] bool
    keys: torch.Tensor | None  # [b] counter-noise keys
    cols: torch.Tensor | None  # [V] int64 vocabulary indices (counter noise)
    width: int  # P
    static: bool
    stop_scanned: int = 0  # decode steps whose text the stop-string scan has covered (host side)


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    state: _DecodeState
    sampler: "_Sampler"
