"""Sequence packing: the real tokens of several samples share a row, with per-sample position ids and no
attention across samples; outputs come back in the padded [N, L] layout the trainer reads.

Two attention paths, one packing:
- `varlen` (flash-attention models: `config._attn_implementation` starts with "flash"): one row of all the
  micro-batch's tokens, no attention mask, position ids that restart at 0 per sample. transformers turns those
  resets into cu_seqlens for flash-attention's varlen kernel (its packed position_ids path), so no [S, S] mask
  exists. Needs a GPU; its test is marked `gpu`.
- `mask` (every other implementation: sdpa, eager, on CPU or GPU): rows as wide as the padded input (first-fit
  decreasing, so never more rows, nor wider ones, than the unpacked forward: its attention cost is at most the
  unpacked one) and an explicit additive block-diagonal causal 4D mask [R, 1, C, C] (0 / dtype min).
  transformers passes a 4D mask to the attention as it is; sdpa and eager both add a float mask (a bool mask is
  not additive in eager attention, measured: wrong outputs), and Llama / Qwen2 / GPT-2 / OPT all accept it. The
  position-ids-only packing is not used here because not every model derives its mask from position ids (OPT
  builds a plain causal mask and would attend across samples silently).

Position ids are those of the unpacked row (`position_ids_from_mask`), gathered, so a packed sample sees exactly
the positions, keys and values it sees alone: the outputs equal the unpacked ones up to float rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from align.algos.positions import position_ids_from_mask
from align.models import decoder_and_head


@dataclass
class PackedRows:
    """Where each real token of a padded [N, L] micro-batch sits in the packed [R, C] rows.

    input_ids, position_ids: [R, C]; attention_mask: [R, 1, C, C] additive float (mask path) or None (varlen);
    src_row, src_col: [K] the padded position of each real token; dst_row, dst_col: [K] its packed position.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    src_row: torch.Tensor
    src_col: torch.Tensor
    dst_row: torch.Tensor
    dst_col: torch.Tensor
    shape: tuple[int, int]  # the padded layout (N, L)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[R, C, ...] packed outputs -> [N, L, ...] in the padded layout; zeros at padding (masked positions:
        the trainer never reads them). Differentiable."""
        out = packed.new_zeros(self.shape + tuple(packed.shape[2:]))
        out[self.src_row, self.src_col] = packed[self.dst_row, self.dst_col]
        return out


def uses_varlen(model: nn.Module) -> bool:
    """True for flash-attention models: packed rows go to the varlen kernel through position ids alone."""
    impl = getattr(model.config, "_attn_implementation", None) or ""
    return impl.startswith("flash") or impl.startswith("kernels-community/flash")


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices with sum(lengths) <= capacity each (an item longer than capacity gets its own bin);
    items by decreasing length (ties: input order), each into the first bin it fits; items in a bin stay in input
    order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # sorted() is stable: ties keep input order
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return [sorted(b) for b in bins]


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, varlen: bool,
         mask_dtype: torch.dtype = torch.float32, pad_id: int = 0) -> PackedRows:
    """Pack the real tokens (attention_mask 1) of [N, L] rows into [R, C] rows.

    varlen: one row of every real token (C = their count), no mask. Otherwise rows of C = L (the padded width),
    filled first-fit decreasing, plus the additive block-diagonal causal mask in `mask_dtype`; the tail
    padding of a row attends only to itself (no all-masked row, so no NaN) and its outputs are dropped.
    """
    keep = attention_mask.bool()
    n, length = input_ids.shape
    lengths = keep.sum(-1)
    positions = position_ids_from_mask(attention_mask)
    src_row, src_col = keep.nonzero(as_tuple=True)  # row-major: samples in order, tokens in order
    device = input_ids.device
    if varlen:
        total = int(lengths.sum())
        dst_row = torch.zeros_like(src_row)
        dst_col = torch.arange(total, device=device)
        ids = input_ids[src_row, src_col].view(1, total)
        pos = positions[src_row, src_col].view(1, total)
        return PackedRows(ids, pos, None, src_row, src_col, dst_row, dst_col, (n, length))
    lens = lengths.tolist()
    capacity = max(length, 1)
    bins = first_fit_decreasing(lens, capacity)
    # each sample's packed row and start column, then every token's (row, column) by its index in its sample
    row_of, start_of = [0] * n, [0] * n
    for r, members in enumerate(bins):
        col = 0
        for i in members:
            row_of[i], start_of[i] = r, col
            col += lens[i]
    rank = keep.long().cumsum(-1)[src_row, src_col] - 1  # the token's index among its sample's real tokens
    row_t = torch.tensor(row_of, device=device, dtype=torch.long)
    start_t = torch.tensor(start_of, device=device, dtype=torch.long)
    dst_row, dst_col = row_t[src_row], start_t[src_row] + rank
    rows = len(bins)
    ids = torch.full((rows, capacity), pad_id, dtype=input_ids.dtype, device=device)
    pos = torch.zeros((rows, capacity), dtype=positions.dtype, device=device)
    seg = torch.full((rows, capacity), -1, dtype=torch.long, device=device)  # sample index; -1 = row padding
    ids[dst_row, dst_col] = input_ids[src_row, src_col]
    pos[dst_row, dst_col] = positions[src_row, src_col]
    seg[dst_row, dst_col] = src_row
    causal = torch.ones(capacity, capacity, dtype=torch.bool, device=device).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0) & causal
    allowed |= torch.eye(capacity, dtype=torch.bool, device=device)  # padding sees itself: no empty softmax row
    mask = torch.zeros(allowed.shape, dtype=mask_dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(mask_dtype).min)
    return PackedRows(ids, pos, mask[:, None], src_row, src_col, dst_row, dst_col, (n, length))


def _mask_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the attention scores are in: the module's floating-point parameters'."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def packed_call(module: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, varlen: bool,
                output: str) -> torch.Tensor:
    """`module(input_ids=..., attention_mask=..., position_ids=...)` over packed rows; its `output` field
    ("last_hidden_state" or "logits") back in the padded [N, L, ...] layout."""
    rows = pack(input_ids, attention_mask, varlen=varlen, mask_dtype=_mask_dtype(module))
    out = module(input_ids=rows.input_ids, attention_mask=rows.attention_mask, position_ids=rows.position_ids,
                 use_cache=False)
    return rows.unpack(getattr(out, output))


class _PackedDecoder:
    """Calls like a decoder (`.last_hidden_state` of the padded layout) but runs the packed rows."""

    def __init__(self, decoder: nn.Module, varlen: bool):
        self.decoder, self.varlen = decoder, varlen

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                 **_: object) -> SimpleNamespace:
        # position_ids of the padded layout are recomputed from the mask inside `pack` (the same function)
        hidden = packed_call(self.decoder, input_ids, attention_mask, varlen=self.varlen, output="last_hidden_state")
        return SimpleNamespace(last_hidden_state=hidden)


class PackedCausalLM:
    """A causal LM seen through packing: `align.trainer.forward.response_forward` takes it in place of the model
    (it asks for `config`, `get_decoder()`, `get_output_embeddings()`, or calls it for full logits) and gets the
    padded-layout outputs it slices today, computed over packed rows."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.varlen = uses_varlen(model)
        self._decoder, self._head = decoder_and_head(model)

    @property
    def _align_full_logits(self) -> bool:  # the wrapped model's load-time check (align.models.needs_full_logits)
        return bool(getattr(self.model, "_align_full_logits", False))

    def get_decoder(self) -> _PackedDecoder:
        return _PackedDecoder(self._decoder, self.varlen)

    def get_output_embeddings(self) -> nn.Module:
        return self._head

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                 **_: object) -> SimpleNamespace:
        logits = packed_call(self.model, input_ids, attention_mask, varlen=self.varlen, output="logits")
        return SimpleNamespace(logits=logits)


def maybe_packed(model: nn.Module, pack_sequences: bool) -> nn.Module | PackedCausalLM:
    """The model itself, or its packed view when `train.pack_sequences` is on."""
    return PackedCausalLM(model) if pack_sequences else model


def critic_values(critic: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
                  pack_sequences: bool) -> torch.Tensor:
    """A separate critic's values of the states before each response token: [N, T] (as
    `critic(ids, att, positions)[:, -T - 1:-1]`), packed when `train.pack_sequences` is on."""
    if not pack_sequences:
        return critic(input_ids, attention_mask, position_ids_from_mask(attention_mask))[:, -response_len - 1:-1]
    hidden = packed_call(critic.backbone, input_ids, attention_mask, varlen=uses_varlen(critic.backbone),
                         output="last_hidden_state")
    return critic.head(hidden[:, -response_len - 1:-1])
