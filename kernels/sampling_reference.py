"""PyTorch reference sampler (also the CPU fallback of `align.kernels.sample`).

Semantics (DESIGN.md "Semantics"), per row b, with x = logits[b].float():
  z = x * (1 / T)                                   temperature (T == 0 -> greedy: argmax of x, first index)
  top-k:  keep z >= v_k, v_k = k-th largest z       (ties with v_k are kept; k = 0 or k >= V disables)
  top-p:  over the renormalised top-k survivors, sorted by z descending, the crossing token is the first one
          whose cumulative mass reaches top_p; keep z >= its value (the crossing token and its ties included)
  min-p:  keep z >= z_max + log(min_p)              (same as p >= min_p * p_max, renormalisation cancels)
  draw:   Gumbel-max: argmax over kept tokens of z + g, g = -log(-log(u)) (= the exponential race
          argmax p / E with E = -log(u)), first index on ties. `noise` = g injected explicitly ([B, V], fp32);
          without it g comes from `gumbel_noise(shape, device, generator)`.
Outputs: tokens int64 [B]; logprobs = log_softmax(x)[token] (raw policy, T = 1, no truncation);
sampling_logprobs = log-prob of the token under the truncated temperature-scaled distribution (0 when
greedy); rank = #{j : x_j > x_token}. Invalid rows (any NaN or +inf, or all -inf) give token -1, NaN
log-probs and rank -1 (check=True raises instead, which synchronises with the host).
Cost: one full sort per row when a filter is on (O(V log V)) and several [B, V] temporaries: a reference,
not a fast path.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

_TINY = torch.finfo(torch.float32).tiny
_ONE_MINUS_EPS = 1.0 - 2.0**-24


class SampleOutput(NamedTuple):
    """Result of `align.kernels.sample(..., return_details=True)`; all tensors have shape [B]."""

    tokens: torch.Tensor  # int64, -1 for invalid rows
    logprobs: torch.Tensor  # fp32, log-prob under the raw policy (temperature 1, no truncation)
    sampling_logprobs: torch.Tensor  # fp32, log-prob under the truncated, temperature-scaled distribution
    rank: torch.Tensor  # int64, number of vocabulary entries with strictly larger logit than the token
    # (min(rank, rank_cap) when `sample` was given a rank_cap)


class RowParams(NamedTuple):
    """Per-row sampling parameters on the logits' device, normalised once for both backends."""

    inv_t: torch.Tensor  # fp32 [B]; 0 marks a greedy row
    top_k: torch.Tensor  # int64 [B]; 0 = off
    top_p: torch.Tensor  # fp32 [B]; 1 = off
    log_min_p: torch.Tensor  # fp32 [B]; -inf = off
    filtered: bool  # False when every filter is statically off (all three were disabled Python scalars)
    k_static: int | None = None  # top_k when it was a Python int (sizes the Triton candidate buffer)
    unit_temperature: bool = False  # temperature was the Python scalar 1.0 (z == x: one log-sum-exp suffices)


def _check_scalar(name: str, value: float, lo: float, hi: float) -> None:
    if not (lo <= value <= hi):
        raise ValueError(f"sample: {name}={value} is out of range; use a value in [{lo}, {hi}]")


def row_params(logits: torch.Tensor, temperature, top_k, top_p, min_p) -> RowParams:
    """Broadcast scalars / [B] tensors to per-row tensors. Python scalars are validated (no host sync);
    tensor values are clamped to their valid range on the device instead (temperature < 0 -> greedy)."""
    if logits.dim() != 2:
        raise ValueError(f"sample: logits must be [B, V], got shape {tuple(logits.shape)}; reshape to 2-D first")
    b, v = logits.shape
    dev = logits.device

    def per_row(name, value, dtype):
        if isinstance(value, torch.Tensor):
            t = value.to(device=dev, dtype=dtype).reshape(-1)
            if t.numel() == 1:
                t = t.expand(b)
            if t.numel() != b:
                raise ValueError(f"sample: {name} has {t.numel()} values for {b} rows; pass a scalar or a [B] tensor")
            return t.contiguous(), True
        return torch.full((b,), value, device=dev, dtype=dtype), False

    if not isinstance(temperature, torch.Tensor):
        _check_scalar("temperature", float(temperature), 0.0, float("inf"))
    if not isinstance(top_k, torch.Tensor):
        if int(top_k) != top_k or top_k < 0:
            raise ValueError(f"sample: top_k={top_k} must be a non-negative integer (0 disables top-k)")
    if not isinstance(top_p, torch.Tensor):
        _check_scalar("top_p", float(top_p), 0.0, 1.0)
    if not isinstance(min_p, torch.Tensor):
        _check_scalar("min_p", float(min_p), 0.0, 1.0)

    t, _ = per_row("temperature", temperature, torch.float32)
    t = t.clamp_min(0.0)
    inv_t = torch.where(t > 0, 1.0 / torch.where(t > 0, t, torch.ones_like(t)), torch.zeros_like(t))
    k, k_tensor = per_row("top_k", top_k, torch.int64)
    k = k.clamp_min(0)
    k = torch.where(k >= v, torch.zeros_like(k), k)
    p, p_tensor = per_row("top_p", top_p, torch.float32)
    p = p.clamp(0.0, 1.0)
    mp, mp_tensor = per_row("min_p", min_p, torch.float32)
    log_min_p = torch.log(mp.clamp(0.0, 1.0))
    filtered = k_tensor or p_tensor or mp_tensor
    if not filtered:
        filtered = (0 < int(top_k) < v) or float(top_p) < 1.0 or float(min_p) > 0.0
    k_static = None if k_tensor else (int(top_k) if int(top_k) < v else 0)
    unit_t = not isinstance(temperature, torch.Tensor) and float(temperature) == 1.0
    return RowParams(inv_t.contiguous(), k.contiguous(), p.contiguous(), log_min_p.contiguous(), filtered,
                     k_static, unit_t)


def invalid_rows(x: torch.Tensor) -> torch.Tensor:
    """bool [B]: rows that contain NaN or +inf, or have no finite-or-greater entry (all -inf)."""
    return torch.isnan(x).any(-1) | (x == float("inf")).any(-1) | ~(x > float("-inf")).any(-1)


def gumbel_noise(shape, device, generator=None) -> torch.Tensor:
    """g = -log(-log(u)), u ~ U(0, 1) clamped to [tiny, 1 - 2^-24] so g is always finite."""
    u = torch.rand(shape, device=device, generator=generator, dtype=torch.float32)
    u = u.clamp(_TINY, _ONE_MINUS_EPS)
    return -torch.log(-torch.log(u))


def keep_mask(z: torch.Tensor, params: RowParams) -> torch.Tensor:
    """bool [B, V]: tokens that survive top-k -> top-p -> min-p on the scaled logits z (fp32 [B, V])."""
    b, v = z.shape
    zs, _ = torch.sort(z, dim=-1, descending=True)
    m = zs[:, :1]
    kk = torch.where(params.top_k > 0, params.top_k, torch.full_like(params.top_k, v))
    t_k = zs.gather(1, (kk - 1).unsqueeze(1))
    in_k = zs >= t_k
    e = torch.where(in_k, torch.exp(zs - m), torch.zeros_like(zs))
    cum = torch.cumsum(e, dim=-1) / e.sum(-1, keepdim=True)
    cross = (cum < params.top_p.unsqueeze(1)).sum(-1, keepdim=True)
    cross = torch.minimum(cross, kk.unsqueeze(1) - 1)
    t_p = zs.gather(1, cross)
    t_p = torch.where(params.top_p.unsqueeze(1) < 1.0, t_p, torch.full_like(t_p, float("-inf")))
    t_min = m + params.log_min_p.unsqueeze(1)
    tau = torch.maximum(torch.maximum(t_k, t_p), t_min)
    return z >= tau


def sample_reference(
    logits: torch.Tensor,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    return_details: bool = False,
    check: bool = False,
    rank_cap: int | None = None,
):
    """PyTorch reference of `align.kernels.sample` (sort-based). logits [B, V] fp32/bf16/fp16 -> (tokens [B], logprobs [B])
    or SampleOutput. Formulas: see the module docstring (Gumbel-max: Gumbel 1954; top-p: Holtzman et al. 2020;
    min-p: Nguyen et al. 2024)."""
    params = row_params(logits, temperature, top_k, top_p, min_p)
    x = logits.float()
    b, v = x.shape
    bad = invalid_rows(x)
    xs = torch.where(bad.unsqueeze(1), torch.zeros_like(x), x)  # keep the arithmetic of invalid rows finite
    greedy = params.inv_t == 0
    inv_t = torch.where(greedy, torch.ones_like(params.inv_t), params.inv_t)
    z = xs * inv_t.unsqueeze(1)
    keep = keep_mask(z, params) if params.filtered else None
    if noise is None:
        g = gumbel_noise((b, v), x.device, generator)
    else:
        if noise.shape != (b, v):
            raise ValueError(f"sample: noise must have the logits' shape {(b, v)}, got {tuple(noise.shape)}")
        g = noise.to(device=x.device, dtype=torch.float32)
    score = z + g
    zk = z
    if keep is not None:
        score = score.masked_fill(~keep, float("-inf"))
        zk = z.masked_fill(~keep, float("-inf"))
    tok = torch.where(greedy, torch.argmax(xs, dim=-1), torch.argmax(score, dim=-1))
    idx = tok.unsqueeze(1)
    # log-probs as (value - row max) - logsumexp(row - row max): the first subtraction is exact, so huge
    # logits keep full precision
    mx = xs.amax(-1, keepdim=True)
    logprobs = ((xs.gather(1, idx) - mx) - torch.logsumexp(xs - mx, -1, keepdim=True)).squeeze(1)
    mz = zk.amax(-1, keepdim=True)
    slp = ((zk.gather(1, idx) - mz) - torch.logsumexp(zk - mz, -1, keepdim=True)).squeeze(1)
    slp = torch.where(greedy, torch.zeros_like(slp), slp)
    if return_details and rank_cap != 0:
        rank = (xs > xs.gather(1, idx)).sum(-1)
        rank = rank if rank_cap is None else rank.clamp_max(rank_cap)
    else:  # nobody reads it: skip the [B, V] pass
        rank = torch.zeros_like(tok)
    nan = torch.full_like(logprobs, float("nan"))
    tok = torch.where(bad, torch.full_like(tok, -1), tok)
    logprobs = torch.where(bad, nan, logprobs)
    slp = torch.where(bad, nan, slp)
    rank = torch.where(bad, torch.full_like(rank, -1), rank)
    if check:
        raise_on_invalid(tok)
    if return_details:
        return SampleOutput(tok, logprobs, slp, rank)
    return tok, logprobs


def raise_on_invalid(tokens: torch.Tensor) -> None:
    """Host-side check (synchronises): raise if any row was invalid (token -1)."""
    bad = (tokens < 0).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"sample: logits rows {bad[:8]}{'...' if len(bad) > 8 else ''} contain NaN/+inf or are all -inf; "
            "fix the model output (or mask with a finite value) before sampling"
        )
