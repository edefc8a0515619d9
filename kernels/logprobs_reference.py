"""PyTorch reference of `align.kernels.token_logprobs` (also its CPU fallback).

logp[n] = log_softmax(x[n] / T)[tokens[n]]; entropy[n] = -sum_v p_v log p_v with p = softmax(x[n] / T)
(0 log 0 = 0). Tokens outside [0, V) give NaN (never a silent value). Differentiable through autograd.
Cost: fp32 temporaries of 2^18 (CPU) / 2^26 (GPU) elements per chunk of rows without autograd; with autograd
the graph keeps each chunk's fp32 copy (O(N V) memory, like any eager implementation).
"""

from __future__ import annotations

import torch

# rows per chunk = elements / V: bounded fp32 temporaries in no-grad calls (bigger on GPUs: fewer launches)
_CHUNK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 26}  # CPU: cache-sized chunks were fastest here


def temperature_tensor(temperature, lead_shape, device) -> torch.Tensor | float:
    """Validate a scalar temperature (> 0) or broadcast a tensor one to the tokens' shape."""
    if isinstance(temperature, torch.Tensor):
        return temperature.to(device=device, dtype=torch.float32).expand(lead_shape)
    if not float(temperature) > 0:
        raise ValueError(
            f"token_logprobs: temperature={temperature} must be > 0 (log-probs of a greedy policy are undefined)"
        )
    return float(temperature)


def check_shapes(logits: torch.Tensor, tokens: torch.Tensor, fn: str) -> None:
    if logits.dim() < 2 or tuple(logits.shape[:-1]) != tuple(tokens.shape):
        raise ValueError(
            f"{fn}: logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} do not match; pass logits [N, V] "
            "with tokens [N] or logits [B, T, V] with tokens [B, T]"
        )
    if tokens.dtype.is_floating_point:
        raise ValueError(f"{fn}: tokens must be an integer tensor, got {tokens.dtype}; use tokens.long()")


def token_logprobs_reference(
    logits: torch.Tensor, tokens: torch.Tensor, temperature=1.0, with_entropy: bool = False
):
    """logits [..., V], tokens [...] -> logp fp32 [...] (and entropy fp32 [...]).

    Per chunk of rows (bounded fp32 temporaries): zs = z - max(z); logp = zs[token] - logsumexp(zs);
    entropy = logsumexp(zs) - sum softmax(zs) * zs. Differentiable through autograd."""
    check_shapes(logits, tokens, "token_logprobs")
    v = logits.shape[-1]
    lead = tokens.shape
    t = temperature_tensor(temperature, lead, logits.device)
    x = logits.reshape(-1, v)
    tok = tokens.reshape(-1).long()
    inv_t = (1.0 / t).reshape(-1, 1) if isinstance(t, torch.Tensor) else (None if t == 1.0 else 1.0 / t)
    valid = (tok >= 0) & (tok < v)
    idx = tok.clamp(0, v - 1).unsqueeze(-1)
    chunk = max(1, _CHUNK_ELEMENTS.get(logits.device.type, 1 << 18) // max(1, v))
    lps, ents = [], []
    for a in range(0, x.shape[0], chunk):
        z = x[a : a + chunk].float()
        if isinstance(inv_t, torch.Tensor):
            z = z * inv_t[a : a + chunk]
        elif inv_t is not None:
            z = z * inv_t
        zs = z - z.amax(-1, keepdim=True).detach()  # exact shift; -inf rows give NaN, as log_softmax does
        lse = torch.logsumexp(zs, -1)
        lps.append(zs.gather(-1, idx[a : a + chunk]).squeeze(-1) - lse)
        if with_entropy:
            p = torch.softmax(zs, -1)
            zs_safe = torch.where(p > 0, zs, torch.zeros_like(zs))  # 0 * -inf would poison values and grads
            ents.append(lse - (p * zs_safe).sum(-1))
    logp = torch.cat(lps) if lps else x.new_zeros(0, dtype=torch.float32)
    logp = torch.where(valid, logp, torch.full_like(logp, float("nan"))).reshape(lead)
    if not with_entropy:
        return logp
    entropy = torch.cat(ents) if ents else x.new_zeros(0, dtype=torch.float32)
    return logp, entropy.reshape(lead)
