"""How the trainer cuts its forward passes into micro-batches: a fixed number of rows, or a token budget.

`train.max_tokens_per_micro_batch: 0` keeps today's fixed `train.micro_batch_size` rows. A budget B > 0 cuts by
tokens instead (`micro_batch_size` is then unused): with `train.pack_sequences` a sample costs its real tokens
(prompt + response, no padding: what a packed forward processes), without it every row costs the batch's padded
width (what an unpacked forward processes, so the budget becomes floor(B / width) rows). Micro-batches are filled
first-fit decreasing (as verl's `use_dynamic_bsz` and OpenRLHF's packing balance by length); a sample longer than
B gets a micro-batch of its own rather than an error, since response lengths come from the policy and a long one
must not stop a run (the forward then holds that one sample, as any run that generated it must).

Gradients accumulate over the micro-batches with the minibatch's denominators, so any cut gives the same loss and
gradients; metrics that are token means are weighted by the micro-batch's share of the minibatch's response tokens,
so they do not depend on the cut either.
"""
from __future__ import annotations

import torch

from align.trainer.packing import first_fit_decreasing


def micro_batches(rows: torch.Tensor, attention_mask: torch.Tensor, micro_batch_size: int, max_tokens: int,
                  pack_sequences: bool) -> list[torch.Tensor]:
    """Index tensors that partition `rows` (indices into the batch whose [N, L] mask is `attention_mask`)."""
    if max_tokens <= 0:
        return list(rows.split(micro_batch_size))
    if pack_sequences:
        cost = attention_mask[rows].sum(-1).tolist()
    else:
        cost = [attention_mask.shape[1]] * rows.numel()
    return [rows[torch.tensor(b, dtype=torch.long, device=rows.device)] for b in first_fit_decreasing(cost, max_tokens)]


def in_row_order(chunks: list[torch.Tensor], plan: list[torch.Tensor]) -> torch.Tensor:
    """Per-micro-batch outputs (chunk k holds rows plan[k]) -> one tensor in batch row order (the plan covers
    rows 0..N-1 once each)."""
    order = torch.cat(plan)
    stacked = torch.cat(chunks)
    out = torch.empty_like(stacked)
    out[order.to(stacked.device)] = stacked
    return out


def metric_weight(micro_mask: torch.Tensor, mini_mask: torch.Tensor) -> float:
    """The weight of a micro-batch's token-mean metric in the minibatch's: its share of the response tokens."""
    total = float(mini_mask.sum())
    return float(micro_mask.sum()) / total if total > 0 else 0.0
