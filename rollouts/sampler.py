"""The sampling half of a rollout decode step: counter-keyed Gumbel noise, the CPU `ScalarSampler`, and
`_Sampler` (logit masks, noise, the `align.kernels.sample` call, the in-place record of its results).

Split from `align.rollouts.engine`, which owns the decode state and the loop; see its docstring for the whole
design (why counter noise, why a scalar sampler on the CPU).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from align import kernels
from align.kernels.sampling_reference import gumbel_noise
from align.rollouts.noise import _GOLDEN, _M1, _M2

if TYPE_CHECKING:
    from align.rollouts.decode_state import _DecodeState
    from align.rollouts.engine import RolloutEngine
    from align.rollouts.params import SamplingParams

_TINY = torch.finfo(torch.float32).tiny


def gumbel_from_uniform(u: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(u.clamp(_TINY, 1.0 - 2.0**-24)))


def _mix64_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """rollouts.noise.mix64 in place (tmp: a scratch tensor of x's shape): large int64 temporaries cost more
    than the arithmetic on CPU."""
    for shift, mult in ((30, _M1), (27, _M2), (31, None)):
        torch.bitwise_right_shift(x, shift, out=tmp)
        tmp &= (1 << (64 - shift)) - 1  # logical shift (torch's >> is arithmetic)
        x ^= tmp
        if mult is not None:
            x *= mult
    return x


def counter_gumbel(keys: torch.Tensor, steps: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Gumbel noise [B, S, V] for samples `keys` [B] at decode steps `steps` [S] (int64 tensors on the device).

    Bit-identical to gumbel_from_uniform(rollouts.noise.uniform_noise(keys, step, V)) for each step, but the
    step is a tensor (no host value, so it can live inside a CUDA graph) and S steps are drawn in one go.
    """
    h = steps[:, None] * _GOLDEN + cols[None, :]
    h = _mix64_(h, torch.empty_like(h))
    x = keys[:, None, None] ^ h[None]
    tmp = torch.empty_like(x)
    _mix64_(x, tmp)
    torch.bitwise_right_shift(x, 40, out=tmp)
    tmp &= (1 << 24) - 1
    u = tmp.to(torch.float32).add_(0.5).mul_(1.0 / (1 << 24))
    return u.clamp_(_TINY, 1.0 - 2.0**-24).log_().neg_().log_().neg_()  # -log(-log(u)), as gumbel_from_uniform


class ScalarSampler:
    """`align.kernels.sample_reference` for one set of Python-scalar parameters, with its constants built once.

    Same semantics and, for valid rows, the same tokens bit for bit (the same fp32 operations on the same
    values; see kernels/sampling_reference.py for the formulas: temperature -> top-k -> top-p -> min-p ->
    Gumbel-max); the sort-free shortcuts only skip filters that are off. The reference rebuilds per-row
    parameter tensors and checks every row for NaN/inf with [B, V] reductions on each call; here a row is
    invalid exactly when its raw log-prob is NaN (any NaN or +inf in the row, or all -inf, makes the whole
    log-softmax NaN, while a valid row's sampled token always has a finite logit), so one `isnan` suffices.
    On CPU, where a decode step of a small model is dominated by per-op overhead, this halves the sampler's
    op count. Invalid rows give token -1 (their log-probs are not specified: the engine raises on them).
    """

    def __init__(self, vocab_size: int, temperature: float, top_k: int, top_p: float, min_p: float,
                 device: torch.device, rank_cap: int | None = None):
        f32 = dict(dtype=torch.float32, device=device)
        self.rank_cap = rank_cap  # as kernels.sample's: min(rank, rank_cap); 0 skips the rank's [B, V] pass
        self.greedy = temperature == 0
        t = torch.tensor(temperature if temperature > 0 else 1.0, **f32)
        self.inv_t = None if temperature in (0, 1) else 1.0 / t  # x * 1.0 == x: skip the multiply
        self.k = top_k if 0 < top_k < vocab_size else 0
        self.p = torch.tensor(top_p, **f32) if top_p < 1.0 else None
        self.log_min_p = torch.log(torch.tensor(min_p, **f32)) if min_p > 0.0 else None
        self.filtered = bool(self.k or self.p is not None or self.log_min_p is not None)
        self.kk = self.k if self.k else vocab_size

    def __call__(self, logits: torch.Tensor, noise: torch.Tensor | None,
                 generator: torch.Generator | None = None) -> kernels.SampleOutput:
        x = logits.float()
        if self.greedy:
            tok = x.argmax(-1)
            logp = torch.log_softmax(x, -1).gather(1, tok[:, None]).squeeze(1)
            slp = torch.zeros_like(logp)
        else:
            z = x if self.inv_t is None else x * self.inv_t
            keep = self._keep(z) if self.filtered else None
            if noise is None:
                noise = gumbel_noise(tuple(x.shape), x.device, generator)
            score = z + noise
            if keep is not None:
                score = score.masked_fill_(~keep, float("-inf"))
                z = z.masked_fill(~keep, float("-inf"))
            tok = score.argmax(-1)
            idx = tok[:, None]
            logp = torch.log_softmax(x, -1).gather(1, idx).squeeze(1)
            slp = torch.log_softmax(z, -1).gather(1, idx).squeeze(1)
        if self.rank_cap == 0:
            rank = torch.zeros_like(tok)
        else:
            rank = (x > x.gather(1, tok[:, None])).sum(-1)
            rank = rank if self.rank_cap is None else rank.clamp_max_(self.rank_cap)
        tok = tok.masked_fill_(torch.isnan(logp), -1)
        return kernels.SampleOutput(tok, logp, slp, rank)

    def _keep(self, z: torch.Tensor) -> torch.Tensor:
        """bool [B, V]: z >= max(top-k, top-p, min-p thresholds), as kernels.sampling_reference.keep_mask."""
        zs = torch.sort(z, dim=-1, descending=True).values
        m = zs[:, :1]
        tau = None
        if self.k:
            tau = zs[:, self.k - 1:self.k]
        if self.p is not None:
            e = torch.exp(zs - m)
            if self.k:
                e = e.masked_fill_(zs < tau, 0.0)
            cum = torch.cumsum(e, dim=-1) / e.sum(-1, keepdim=True)
            cross = (cum < self.p).sum(-1, keepdim=True).clamp_max_(self.kk - 1)
            t_p = zs.gather(1, cross)
            tau = t_p if tau is None else torch.maximum(tau, t_p)
        if self.log_min_p is not None:
            t_min = m + self.log_min_p
            tau = t_min if tau is None else torch.maximum(tau, t_min)
        return z >= tau


class _Sampler:
    """The sampling half of a decode step for one micro-batch's parameters: logit masks, noise, the
    `align.kernels.sample` call, and the in-place record of its results."""

    def __init__(self, engine: RolloutEngine, params: SamplingParams, stop_ids: list[int],
                 generator: torch.Generator | None):
        dev = engine.device
        self.engine, self.params, self.generator = engine, params, generator
        self.stop_ids = torch.tensor(stop_ids, dtype=torch.long, device=dev) if stop_ids else None
        vocab = engine._vocab_size()
        self.allowed_bias = None
        if params.allowed_token_ids is not None:
            self.allowed_bias = torch.full((vocab,), float("-inf"), device=dev)
            self.allowed_bias[torch.tensor(params.allowed_token_ids, device=dev)] = 0.0
        self.stop_bias = None  # -inf on stop tokens while t < min_new_tokens
        if params.min_new_tokens > 0 and self.stop_ids is not None:
            self.stop_bias = torch.zeros(vocab, device=dev).index_fill_(0, self.stop_ids, float("-inf"))
        self.min_new = torch.tensor(params.min_new_tokens, device=dev)
        self.greedy = params.temperature == 0
        # CPU + "auto": the reference semantics with constants built once (ScalarSampler); else kernels.sample
        self.scalar = None
        if dev.type == "cpu" and engine.sampler_backend == "auto":
            self.scalar = ScalarSampler(vocab, params.temperature, params.top_k, params.top_p, params.min_p, dev,
                                        rank_cap=engine.gate_top_k)
        self.noise_chunk: tuple[int, torch.Tensor] | None = None  # (first step, [b, S, V]) on the host path
        # counter noise drawn inside the Triton kernel (align.kernels.counter: the same numbers, no [b, V]
        # int64 temporaries and no noise tensor); the PyTorch paths take it materialised
        b = engine.sampler_backend
        self.fused_noise = b == "triton" or (b == "auto" and dev.type == "cuda")
        self.signature = (params.temperature, params.top_k, params.top_p, params.min_p, tuple(stop_ids),
                          params.min_new_tokens, tuple(params.allowed_token_ids or ()), engine.sampler_backend,
                          engine.gate_top_k, engine.pad_id)

    def _noise(self, state: _DecodeState, logits: torch.Tensor, t: int | None) -> torch.Tensor | None:
        if state.keys is None or self.greedy or self.fused_noise:
            return None
        if t is None:
            return counter_gumbel(state.keys, state.step, state.cols)[:, 0]
        # host path: draw several steps at once (same numbers, fewer small ops), at most 2^18 values a chunk
        if self.noise_chunk is None or not (0 <= t - self.noise_chunk[0] < self.noise_chunk[1].shape[1]):
            b, v = logits.shape
            span = max(1, min(self.params.max_new_tokens - t, (1 << 18) // max(1, b * v), 64))
            steps = torch.arange(t, t + span, device=logits.device)
            self.noise_chunk = (t, counter_gumbel(state.keys, steps, state.cols))
        return self.noise_chunk[1][:, t - self.noise_chunk[0]]

    def sample_record(self, state: _DecodeState, logits: torch.Tensor, t: int | None) -> None:
        """Sample the token of step t (host int, or None: read `state.step`) and write it to the buffers."""
        p = self.params
        sampling_logits = logits if self.allowed_bias is None else logits + self.allowed_bias
        if self.stop_bias is not None:
            if t is None:
                sampling_logits = sampling_logits + torch.where(state.step < self.min_new, self.stop_bias, 0.0)
            elif t < p.min_new_tokens:
                sampling_logits = sampling_logits + self.stop_bias
        noise = self._noise(state, logits, t)
        if self.scalar is not None:
            out = self.scalar(sampling_logits, noise, self.generator)
        else:
            fused = self.fused_noise and state.keys is not None and not self.greedy
            out = kernels.sample(sampling_logits, p.temperature, p.top_k, p.top_p, p.min_p, generator=self.generator,
                                 noise=noise, return_details=True, backend=self.engine.sampler_backend,
                                 rank_cap=self.engine.gate_top_k,  # topk_hit = rank < gate_top_k; 0: none
                                 counter=(state.keys, state.step) if fused else None)
        token, raw_logp = out.tokens, out.logprobs
        if sampling_logits is not logits:  # the raw policy is the unmasked distribution
            lf = logits.float()
            raw_logp = lf.gather(1, token.clamp_min(0)[:, None]).squeeze(1) - torch.logsumexp(lf, dim=-1)
        # rows that finished earlier keep decoding their own samples; `out_live` masks them out in _collect
        state.bad.logical_or_(token < 0)
        token = token.clamp_min(0)  # an invalid row raises at the next check; keep the embedding lookup in range
        values = (token, raw_logp, out.sampling_logprobs, out.rank < self.engine.gate_top_k, ~state.finished)
        buffers = (state.out_tokens, state.out_logp, state.out_slp, state.out_hit, state.out_live)
        for buf, val in zip(buffers, values):
            if t is None:
                buf.index_copy_(1, state.step, val[:, None])
            else:
                buf[:, t] = val
        if self.stop_ids is not None:
            state.finished.logical_or_((token[:, None] == self.stop_ids).any(-1))
        state.tokens.copy_(token)
        state.step.add_(1)
