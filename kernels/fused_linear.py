"""Chunked fused linear + token log-probs: hidden states and lm_head weight in, log-probs out.

`fused_linear_logprobs(hidden [N, H] or [B, T, H], weight [V, H], tokens, bias=None, temperature, with_entropy,
chunk_size)` computes logits = hidden @ weight.T + bias for `chunk_size` rows at a time and reduces each
chunk to log-probs (and entropy) with `token_logprobs`, so [N, V] logits never exist: not in the forward,
and not in the backward, which recomputes each chunk's logits, gets dlogits from the token_logprobs
backward (the Triton kernel on CUDA) and accumulates dhidden = dlogits @ W and dW += dlogits.T @ h
(each chunk's product computed in fp32 and added into an fp32 dW / dbias, rounded to the weight's dtype once). Same idea as Liger's fused linear cross-entropy; here the output is
the per-token log-prob that RL losses need.
Cost: forward 1 matmul; backward 2 recomputed + 2 gradient matmuls; peak extra memory about
chunk_size * V logits plus their gradient (default chunk: ~2^27 / V rows, e.g. 883 rows for V = 151,936).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from align.kernels.logprobs import token_logprobs

_CHUNK_ELEMENTS = 1 << 27


def transform_logits(logits: torch.Tensor, scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """What some architectures do to lm_head(h) before the softmax: multiply by `scale` (Cohere's logit_scale,
    Granite's 1 / logits_scaling), then soft-cap to (-softcap, softcap) (Gemma-2's final_logit_softcapping)."""
    if scale != 1.0:
        logits = logits * scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def _chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield start, min(n, start + chunk)


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")  # backward recomputes under the forward's autocast state
    def forward(ctx, hidden, weight, bias, tokens, temperature, with_entropy, chunk, backend, scale, softcap):
        n = hidden.shape[0]
        lp = torch.empty(n, device=hidden.device, dtype=torch.float32)
        ent = torch.empty(n if with_entropy else 0, device=hidden.device, dtype=torch.float32)
        with torch.no_grad():
            for a, b in _chunks(n, chunk):
                logits = transform_logits(F.linear(hidden[a:b], weight, bias), scale, softcap)
                out = token_logprobs(logits, tokens[a:b], temperature, with_entropy, backend)
                if with_entropy:
                    lp[a:b], ent[a:b] = out
                else:
                    lp[a:b] = out
        ctx.save_for_backward(hidden, weight, bias, tokens)
        ctx.args = (temperature, with_entropy, chunk, backend, scale, softcap)
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, tokens = ctx.saved_tensors
        temperature, with_entropy, chunk, backend, scale, softcap = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n = hidden.shape[0]
        use_ent = with_entropy and g_ent is not None
        if g_lp is None:
            g_lp = torch.zeros(n, device=hidden.device, dtype=torch.float32)
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
        db = torch.zeros(bias.shape, device=bias.device, dtype=torch.float32) if need_b else None
        for a, b in _chunks(n, chunk):
            h = hidden[a:b]
            with torch.enable_grad():
                logits = F.linear(h, weight, bias).detach().requires_grad_()
                out = token_logprobs(transform_logits(logits, scale, softcap), tokens[a:b], temperature, use_ent, backend)
                outs, grads = ([out[0], out[1]], [g_lp[a:b], g_ent[a:b]]) if use_ent else ([out], [g_lp[a:b]])
                (dlogits,) = torch.autograd.grad(outs, [logits], grads)
            if need_h:
                dh[a:b] = dlogits.to(weight.dtype) @ weight
            # dW and dbias sum over every chunk: add each chunk's fp32 product into the fp32 buffer, never a
            # chunk's gradient rounded to the weight dtype first (RL advantages of both signs cancel across
            # chunks, so per-chunk bf16 rounding errors would dominate the small total)
            if need_w:
                dw.addmm_(dlogits.t().float(), h.float())
            if need_b:
                db += dlogits.float().sum(0)
        dw = dw.to(weight.dtype) if need_w else None
        db = db.to(bias.dtype) if need_b else None
        return dh, dw, db, None, None, None, None, None, None, None


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
    logit_scale: float = 1.0,
    softcap: float | None = None,
):
    """logp[n] = log_softmax(z[n] / T)[tokens[n]] with z = transform_logits(hidden[n] @ weight.T + bias,
    logit_scale, softcap), without materialising [N, V] logits.

    hidden [N, H] or [B, T, H], weight [V, H], tokens [N] or [B, T], bias [V] or None -> logp fp32 (and entropy),
    shaped like tokens. Differentiable w.r.t. hidden, weight and bias. chunk_size: rows per chunk (default
    ~2^27 / V). temperature: float > 0.
    """
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"fused_linear_logprobs: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not match; "
            "weight must be [V, H] (an nn.Linear / lm_head weight) with H = hidden.shape[-1]"
        )
    if tuple(hidden.shape[:-1]) != tuple(tokens.shape):
        raise ValueError(
            f"fused_linear_logprobs: hidden {tuple(hidden.shape)} and tokens {tuple(tokens.shape)} do not match; "
            "pass hidden [N, H] with tokens [N] or hidden [B, T, H] with tokens [B, T]"
        )
    if isinstance(temperature, torch.Tensor) or not float(temperature) > 0:
        raise ValueError(f"fused_linear_logprobs: temperature={temperature} must be a float > 0")
    v = weight.shape[0]
    chunk = int(chunk_size) if chunk_size is not None else max(1, _CHUNK_ELEMENTS // v)
    if chunk < 1:
        raise ValueError(f"fused_linear_logprobs: chunk_size={chunk_size} must be >= 1")
    lead = tokens.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    tok = tokens.reshape(-1)
    lp, ent = _FusedLinearLogprobs.apply(h2, weight, bias, tok, float(temperature), with_entropy, chunk, backend,
                                         float(logit_scale), float(softcap) if softcap else None)
    if with_entropy:
        return lp.reshape(lead), ent.reshape(lead)
    return lp.reshape(lead)
