"""Sampling parameters for one generate call."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How to sample. Order: temperature -> top-k -> top-p -> min-p -> draw (see kernels.sample).

    temperature 0 = greedy. top_k 0, top_p 1, min_p 0 disable their filter.
    stop_token_ids: generation of a row ends after one of these (the tokenizer's EOS is added by the engine
    unless `ignore_eos`). stop: strings; a row ends once its decoded text contains one (the text after it
    is masked out). allowed_token_ids: restrict sampling to these ids (e.g. image tokens of a UMM).
    min_new_tokens: stop tokens are suppressed before this many tokens.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    min_new_tokens: int = 0
    allowed_token_ids: list[int] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens = {self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature = {self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k = {self.top_k}: must be >= 0 (0 disables top-k)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p = {self.top_p}: must be in (0, 1]")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p = {self.min_p}: must be in [0, 1)")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens = {self.min_new_tokens} exceeds max_new_tokens = {self.max_new_tokens}")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValueError("allowed_token_ids is empty: give at least one token id (or None for no restriction)")
