"""Teacher-forced forward passes: response-token log-probs (and entropy, values, hidden states).

Log-probs go through `align.kernels.fused_linear_logprobs` (hidden states and lm_head weight in, log-probs out),
so the trainer never holds [N, T, V] logits. Position ids are computed from the attention mask exactly as
the rollout engine does, so recomputed log-probs match the sampled ones. Under FSDP the pass runs as a forward of
the model's root unit (`align.distributed.fsdp.as_root_forward`), which gathers the sharded lm_head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from align import kernels
from align.algos.positions import position_ids_from_mask
from align.distributed.fsdp import as_root_forward
from align.models import decoder_and_head, logit_transform, needs_full_logits
from align.precision import autocast_forward
from align.trainer.packing import PackedCausalLM

# Below this many logits (4M, 16 MB in fp32) the full [N, V] matrix is cheaper than chunking.
SMALL_LOGITS = 1 << 22


@dataclass
class ForwardOutput:
    logprobs: torch.Tensor  # [N, T] log p(response token t | prefix), fp32
    entropy: torch.Tensor | None = None  # [N, T] entropy of the next-token distribution at t
    values: torch.Tensor | None = None  # [N, T] value of the state before response token t
    hidden: torch.Tensor | None = None  # [N, T + 1, H] last-layer states before token t (t = 0..T)


@autocast_forward  # bf16 autocast on CUDA with fp32 masters (align.precision); a no-op on CPU
def response_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int, *,
                     value_head: nn.Module | None = None, with_entropy: bool = False,
                     return_hidden: bool = False, temperature: float = 1.0) -> ForwardOutput:
    """One forward of `model` over prompt + response; outputs for the last `response_len` tokens.

    Log-probs and entropy are of softmax(logits / temperature): the trainer passes the rollout temperature,
    so the policy it optimises is the one that sampled (as TRL and verl do).

    input_ids, attention_mask: [N, P + T] (prompt left-padded, response right-padded); response_len = T.
    The hidden state at position P + t - 1 predicts response token t.
    """
    n, length = input_ids.shape
    start = length - response_len
    positions = position_ids_from_mask(attention_mask)
    tokens = input_ids[:, start:]
    decoder, head = decoder_and_head(model)
    if needs_full_logits(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False).logits
        hidden = None
        out = kernels.token_logprobs(logits[:, start - 1:length - 1], tokens, temperature=temperature,
                                     with_entropy=with_entropy)
    else:
        def teacher_forced() -> tuple:
            # under FSDP this runs inside the root unit's forward hooks: `head.weight` is the gathered weight here
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                             use_cache=False).last_hidden_state  # no KV cache in teacher-forced passes
            h = hidden[:, start - 1:length - 1].reshape(n * response_len, -1)
            scale, softcap = logit_transform(model)
            if n * response_len * head.weight.shape[0] <= SMALL_LOGITS:
                # small vocab x tokens: one matmul beats the chunked path's recompute, and memory is no issue
                logits = kernels.transform_logits(torch.nn.functional.linear(h, head.weight, head.bias), scale, softcap)
                got = kernels.token_logprobs(logits, tokens.reshape(-1), temperature=temperature,
                                             with_entropy=with_entropy)
            else:
                got = kernels.fused_linear_logprobs(h, head.weight, tokens.reshape(-1), bias=head.bias,
                                                    temperature=temperature, with_entropy=with_entropy,
                                                    logit_scale=scale, softcap=softcap)
            return (*got, hidden) if with_entropy else (got, hidden)

        *out, hidden = as_root_forward(model.model if isinstance(model, PackedCausalLM) else model, teacher_forced)
        out = tuple(out) if with_entropy else out[0]
    logp, ent = out if with_entropy else (out, None)
    logp = logp.reshape(n, response_len)
    ent = ent.reshape(n, response_len) if ent is not None else None
    values = None
    if value_head is not None:
        if hidden is None:
            raise ValueError("a value head needs hidden states; this model only exposes full logits")
        values = value_head(hidden[:, start - 1:length - 1])
    states = hidden[:, start - 1:] if (return_hidden and hidden is not None) else None
    return ForwardOutput(logprobs=logp, entropy=ent, values=values, hidden=states)


def chunked(n: int, size: int):
    for lo in range(0, n, size):
        yield slice(lo, min(n, lo + size))
