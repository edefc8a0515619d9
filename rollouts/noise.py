"""Counter-based random numbers keyed by (sample key, decode step, vocabulary index).

A sample's draws depend only on its own key, never on which other rows share its batch, so splitting a
batch across 1 or N rollout workers (or re-bucketing prompts) samples exactly the same tokens.
The mixer is SplitMix64's finaliser (Steele et al. 2014), done in int64 tensor arithmetic.
"""
from __future__ import annotations

import torch

# one definition, shared with the Triton sampler's in-kernel draw (align.kernels.counter)
from align.kernels.counter import GOLDEN as _GOLDEN
from align.kernels.counter import M1 as _M1
from align.kernels.counter import M2 as _M2


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    x = x ^ _shr(x, 30)
    x = x * _M1
    x = x ^ _shr(x, 27)
    x = x * _M2
    return x ^ _shr(x, 31)


def sample_keys(seed: int, sample_ids: torch.Tensor) -> torch.Tensor:
    """[B] int64 keys for samples `sample_ids` under run seed `seed`."""
    return mix64(sample_ids.to(torch.int64) * _GOLDEN + mix64(torch.tensor(seed, dtype=torch.int64)))


def uniform_noise(keys: torch.Tensor, step: int, vocab_size: int) -> torch.Tensor:
    """[B, V] float32 uniforms in (0, 1), a function of (key, step, column) only."""
    cols = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    x = mix64(keys[:, None] ^ mix64(torch.tensor(step, dtype=torch.int64, device=keys.device) * _GOLDEN + cols[None, :]))
    top24 = _shr(x, 40).to(torch.float32)
    return (top24 + 0.5) * (1.0 / (1 << 24))
