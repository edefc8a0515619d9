"""Token log-probs and entropy in one pass over the vocabulary (Triton), forward and backward.

`token_logprobs(logits [N, V] or [B, T, V], tokens, temperature, with_entropy)`:
  z = x * (1/T);  logp = z[token] - logsumexp(z);  entropy = logsumexp(z) - sum_v softmax(z)_v z_v.
Forward: one program per row streams the row once in tiles of BLOCK (loads upcast to fp32) keeping a
running max m, s = sum exp(z - m) and, for the entropy, w = sum exp(z - m)(z - m), rescaled when m grows
(online softmax, Milakov & Gimelshein 2018); entropy = log s - w / s; logp = (z_tok - m) - log s (exact
subtraction first, so huge logits keep full precision). Saves only m, log s and entropy, [N] each
(O(N) extra memory; the logits are the caller's tensor). Cost: 1 read of the logits, 1 exp per
element (the rescale of s and w is one scalar exp per tile).
Backward: one pass per row recomputes p = exp((z - m) - log s) and writes
  dL/dx = (1/T) * [ g_logp * (onehot(token) - p) - g_ent * p * (log p + H) ]
in the logits' dtype. Cost: 1 read + 1 write of the logits.
Tokens outside [0, V) give NaN log-probs (explicit, never a silent value).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from align.kernels._common import next_pow2, resolve_backend
from align.kernels._tl import MAX as _MAX
from align.kernels._tl import SUM as _SUM
from align.kernels.logprobs_reference import check_shapes, temperature_tensor, token_logprobs_reference


@triton.jit
def _logprob_fwd_kernel(x_ptr, T, stride_b, stride_t, tok_ptr, inv_t_ptr, lp_ptr, m_ptr, logs_ptr, ent_ptr,
                        V: tl.constexpr, BLOCK: tl.constexpr, WITH_ENT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    # rows of a [B, T, V] view (e.g. logits[:, :-1]) are addressed through its strides: no copy
    xrow = x_ptr + (row // T) * stride_b + (row % T) * stride_t
    inv_t = tl.load(inv_t_ptr + row)
    m = float("-inf")
    s = 0.0
    w = 0.0
    for start in range(0, V, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        z = tl.load(xrow + idx, mask=idx < V, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.reduce(z, 0, _MAX))
        ms = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp(m - ms)
        e = tl.exp(z - ms)
        if WITH_ENT:
            # w is relative to the running max: shift it by (m - m_new) * s when the max grows
            shift = tl.where(s > 0, m - ms, 0.0) * s
            w = a * (w + shift) + tl.reduce(e * tl.where(e > 0, z - ms, 0.0), 0, _SUM)
        s = s * a + tl.reduce(e, 0, _SUM)
        m = m_new
    log_s = tl.log(s)
    tok = tl.load(tok_ptr + row).to(tl.int64)
    ok = (tok >= 0) & (tok < V)
    z_tok = tl.load(xrow + tl.minimum(tl.maximum(tok, 0), V - 1)).to(tl.float32) * inv_t
    # (z - m) is exact, so log-probs of huge logits keep full precision (m + log s would round at |m|)
    tl.store(lp_ptr + row, tl.where(ok, (z_tok - m) - log_s, float("nan")))
    tl.store(m_ptr + row, m)
    tl.store(logs_ptr + row, log_s)
    if WITH_ENT:
        tl.store(ent_ptr + row, log_s - w / s)


@triton.jit
def _logprob_bwd_kernel(x_ptr, T, stride_b, stride_t, dx_ptr, dstride_b, dstride_t, tok_ptr, inv_t_ptr, m_ptr,
                        logs_ptr, ent_ptr, glp_ptr, gent_ptr,
                        V: tl.constexpr, BLOCK: tl.constexpr, WITH_ENT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    xrow = x_ptr + (row // T) * stride_b + (row % T) * stride_t
    dxrow = dx_ptr + (row // T) * dstride_b + (row % T) * dstride_t
    inv_t = tl.load(inv_t_ptr + row)
    m_row = tl.load(m_ptr + row)
    log_s = tl.load(logs_ptr + row)
    glp = tl.load(glp_ptr + row)
    tok = tl.load(tok_ptr + row).to(tl.int64)
    if WITH_ENT:
        gent = tl.load(gent_ptr + row)
        h = tl.load(ent_ptr + row)
    for start in range(0, V, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        m = idx < V
        z = tl.load(xrow + idx, mask=m, other=float("-inf")).to(tl.float32) * inv_t
        logp = (z - m_row) - log_s
        p = tl.exp(logp)
        gz = tl.where(idx == tok, glp, 0.0) - glp * p
        if WITH_ENT:
            gz -= gent * p * tl.where(p > 0, logp + h, 0.0)
        tl.store(dxrow + idx, (gz * inv_t).to(dx_ptr.dtype.element_ty), mask=m)


def _block(v: int) -> int:
    return max(16, min(4096, next_pow2(v)))


def _rows(x: torch.Tensor):
    """(T, row stride over B, row stride over T) addressing the rows of x [N, V] or [B, T, V] (last stride 1)."""
    if x.dim() == 2:
        return max(1, x.shape[0]), 0, x.stride(0)
    return max(1, x.shape[1]), x.stride(0), x.stride(1)


def logprobs_forward_triton(x: torch.Tensor, tok: torch.Tensor, inv_t: torch.Tensor, with_entropy: bool):
    """x [N, V] or [B, T, V] (last stride 1), tok int64 [N], inv_t fp32 [N] -> (logp, stats, entropy or empty).

    stats fp32 [2, N] = (row max of z, log sum exp(z - max)): the O(N) state the backward needs."""
    n, v = tok.numel(), x.shape[-1]
    lp = torch.empty(n, device=x.device, dtype=torch.float32)
    stats = torch.empty((2, n), device=x.device, dtype=torch.float32)
    ent = torch.empty_like(lp) if with_entropy else torch.empty(0, device=x.device, dtype=torch.float32)
    if n:
        _logprob_fwd_kernel[(n,)](x, *_rows(x), tok, inv_t, lp, stats[0], stats[1], ent if with_entropy else lp,
                                  V=v, BLOCK=_block(v), WITH_ENT=with_entropy, num_warps=8)
    return lp, stats, ent


def logprobs_backward_triton(x, tok, inv_t, stats, ent, g_lp, g_ent) -> torch.Tensor:
    """dL/dx (x's shape and dtype, contiguous) from the upstream grads g_lp [N] and g_ent [N] (or None)."""
    n, v = tok.numel(), x.shape[-1]
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if n:
        with_ent = g_ent is not None
        _, db, dt = _rows(dx)
        _logprob_bwd_kernel[(n,)](x, *_rows(x), dx, db, dt, tok, inv_t, stats[0], stats[1],
                                  ent if with_ent else g_lp, g_lp, g_ent if with_ent else g_lp,
                                  V=v, BLOCK=_block(v), WITH_ENT=with_ent, num_warps=8)
    return dx


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tok, inv_t, with_entropy):
        lp, stats, ent = logprobs_forward_triton(x, tok, inv_t, with_entropy)
        ctx.save_for_backward(x, tok, inv_t, stats, ent)
        ctx.with_entropy = with_entropy
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        x, tok, inv_t, stats, ent = ctx.saved_tensors
        if g_lp is None:
            g_lp = torch.zeros_like(stats[0])
        g_ent = g_ent.float().contiguous() if (ctx.with_entropy and g_ent is not None) else None
        dx = logprobs_backward_triton(x, tok, inv_t, stats, ent, g_lp.float().contiguous(), g_ent)
        return dx, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature=1.0,
    with_entropy: bool = False,
    backend: str = "auto",
):
    """Log-prob of `tokens` under softmax(logits / temperature), and optionally the entropy.

    logits [N, V] or [B, T, V] (fp32 / bf16 / fp16; strided views such as logits[:, :-1] are read in place),
    tokens [N] or [B, T] (int) -> logp fp32 [N] / [B, T] (and entropy, same shape).
    temperature: float > 0 or a tensor broadcastable to tokens' shape.
    Differentiable w.r.t. logits (Triton backward on the triton backend; O(N) saved state).
    """
    check_shapes(logits, tokens, "token_logprobs")
    which = resolve_backend(backend, logits, "token_logprobs")
    if which == "torch":
        return token_logprobs_reference(logits, tokens, temperature, with_entropy)
    v = logits.shape[-1]
    lead = tokens.shape
    x = logits if logits.dim() <= 3 else logits.reshape(-1, logits.shape[-2], v)
    if x.stride(-1) != 1:
        x = x.contiguous()
    tok = tokens.reshape(-1).to(torch.int64).contiguous()
    t = temperature_tensor(temperature, lead, logits.device)
    if isinstance(t, torch.Tensor):
        inv_t = (1.0 / t).reshape(-1).contiguous()
    else:
        inv_t = torch.full((tok.numel(),), 1.0 / t, device=logits.device, dtype=torch.float32)
    lp, ent = _TokenLogprobs.apply(x, tok, inv_t, with_entropy)
    if with_entropy:
        return lp.reshape(lead), ent.reshape(lead)
    return lp.reshape(lead)
