"""In-process generation: preallocated KV cache, batched decode, per-row early stop, prompt bucketing,
CUDA graphs for the decode step.

Each micro-batch of similar-length prompts (sorted by length) is left-padded, prefilled once, then decoded
token by token. The whole decode state lives in preallocated device buffers (`_DecodeState`): the KV cache
(transformers' `StaticCache` [b, heads, P + T, d], or `DynamicCache`), an additive attention bias
[b, 1, 1, P + T] whose column for each new token is opened in place (no per-step `torch.cat`), the next
input token, its position, the step counter and [b, T] output buffers written in place. A decode step is
then one function of those buffers (`_decode_step`): model forward of the last token -> `align.kernels.sample`
(temperature -> top-k -> top-p -> min-p; on CPU the equivalent `ScalarSampler`, which builds its constants
once per call instead of every step) -> record token, raw log-prob, sampling log-prob, top-k hit ->
update the per-row `finished` flags. Finished rows keep decoding (masked out of the result); the loop stops
once every row is finished, checked every step on CPU and every `sync_every` steps on CUDA (each check is a
host sync).

CUDA graphs (`cuda_graphs=None`: on for CUDA models with a static cache and sdpa/eager attention): the
decode step is captured once per (padded batch size, padded prompt width, max_new_tokens, sampling
parameters, weights) and replayed; every buffer it touches is static, the cache write position is the
`StaticCache`'s own device counter, and the step counter advances inside the graph, so a replay needs no
host work at all. Up to `graph_cache_size` captured graphs (each with its KV cache) are kept for reuse
across calls, so an RLHF loop captures once per shape. We capture with `torch.cuda.CUDAGraph` directly
rather than `torch.compile(mode="reduce-overhead")`: no compile time, no recompiles when sampling
parameters change, no dynamo graph breaks on the Hugging Face model code or the Triton sampler, and the
same Python step function runs eagerly (CPU, or `cuda_graphs=False`), so graph and eager paths are the
same code. Batch sizes are padded to a power of two (pad rows start finished) and prompt widths to a
multiple of `prompt_bucket` on the graph path only.

Cache choice: the static cache is the default on CUDA (required by graphs); on CPU the `DynamicCache` is
the default: measured on the tiny benchmark models (2-core CPU) it was as fast or up to 10% faster per
decode step than the static cache, whose attention always reads all P + T columns (docs/engine.md).

Log-prob agreement. `RolloutBatch.logprobs` are the raw-policy (temperature 1, untruncated) log-probs of
the sampled tokens, computed from the same bf16/fp32 logits the model returns, with position ids taken
from the attention mask exactly as the trainer's teacher-forced pass (`align.trainer.forward`) does. The
two differ only by floating-point reduction order (incremental decode vs one full-sequence pass).
Measured on CPU in fp32 on the tiny test models: max |rollout - recomputed| about 1e-6 (tests assert
< 1e-4). In bf16 on GPU expect per-token differences of order 1e-2 (bf16 has 8 mantissa bits; the
decode and teacher-forced GEMMs round differently), larger on low-probability tokens; with
`rollout.use_rollout_logprobs = true` the trainer uses these log-probs as old_logprobs and skips one
forward pass, so the first PPO ratio is 1 up to that difference (see docs/engine.md for how to measure it).

Random draws are keyed by (run seed, global sample id, decode step) when `counter_noise` is on (the
default on CPU): a sample draws the same tokens whichever rows share its batch, so 1 or N rollout workers
and any bucketing give identical rollouts. On CUDA the faster generator path (Philox inside the Triton
sampler) is the default.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from align import kernels
from align.algos.positions import position_ids_from_mask
from align.kernels.sampling_reference import gumbel_noise
from align.rollouts.batch import STOP_EOS, STOP_LENGTH, STOP_STRING, RolloutBatch
from align.rollouts.noise import _GOLDEN, _M1, _M2, sample_keys
from align.rollouts.params import SamplingParams

_TINY = torch.finfo(torch.float32).tiny
_BIAS_ATTENTION = ("sdpa", "eager")  # attention implementations that take our additive 4-D bias as is


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
                 device: torch.device):
        f32 = dict(dtype=torch.float32, device=device)
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
        rank = (x > x.gather(1, tok[:, None])).sum(-1)
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


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


@dataclass
class _DecodeState:
    """Every tensor a decode step reads or writes, preallocated for one micro-batch (b rows, P prompt, T new)."""

    cache: Any  # transformers Cache
    bias: torch.Tensor  # [b, 1, 1, P + T] additive attention bias in the model dtype (0 = attend)
    tokens: torch.Tensor  # [b] next input token
    positions: torch.Tensor  # [b] its position id
    step: torch.Tensor  # [1] int64 decode step t of the token being sampled
    col: torch.Tensor  # [1] int64 cache column of the next input token (P + t - 1)
    finished: torch.Tensor  # [b] bool
    bad: torch.Tensor  # [b] bool: a row produced NaN/inf logits
    out_tokens: torch.Tensor  # [b, T]
    out_logp: torch.Tensor  # [b, T] fp32
    out_slp: torch.Tensor  # [b, T] fp32
    out_hit: torch.Tensor  # [b, T] bool
    out_live: torch.Tensor  # [b, T] bool
    keys: torch.Tensor | None  # [b] counter-noise keys
    cols: torch.Tensor | None  # [V] int64 vocabulary indices (counter noise)
    width: int  # P
    static: bool


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    state: _DecodeState
    sampler: "_Sampler"


class RolloutEngine:
    """Generate one response per prompt with a KV-cached model; see the module docstring.

    device: where the model runs (default: its parameters' device). sampler_backend: "auto" (Triton on CUDA,
    ScalarSampler on CPU), "triton" or "torch" (kernels.sample with that backend).
    micro_batch_size: rows decoded together. max_prompt_length: keep only the last this-many prompt tokens.
    gate_top_k: `topk_hit` = the sampled token is among the top-k of the sampling distribution.
    counter_noise: per-sample counter-based noise (default: on for CPU, off for CUDA).
    cuda_graphs: capture the decode step in CUDA graphs (default: on CUDA when the model supports it).
    static_cache: StaticCache (True) or DynamicCache (False); default static on CUDA, dynamic on CPU; graphs
    need it. sync_every: host checks of "all rows finished" every this many steps (default 1 on CPU, 8 on
    CUDA). prompt_bucket: prompt widths are padded to a multiple of this on the graph path (graph reuse).
    graph_cache_size: captured graphs kept for reuse (each holds a KV cache).
    """

    def __init__(self, model: nn.Module, tokenizer, device: torch.device | str | None = None,
                 sampler_backend: str = "auto", micro_batch_size: int = 64, max_prompt_length: int | None = None,
                 gate_top_k: int = 1, counter_noise: bool | None = None, *, cuda_graphs: bool | None = None,
                 static_cache: bool | None = None, sync_every: int | None = None, prompt_bucket: int = 64,
                 graph_cache_size: int = 4):
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.sampler_backend = sampler_backend
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size = {micro_batch_size}: must be >= 1")
        self.micro_batch_size = micro_batch_size
        self.max_prompt_length = max_prompt_length
        self.gate_top_k = gate_top_k
        cuda = self.device.type == "cuda"
        self.counter_noise = (not cuda) if counter_noise is None else counter_noise
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        config = getattr(model, "config", None)
        attn = getattr(config, "_attn_implementation", None) or "eager"
        layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
        # Our own 4-D additive bias replaces Hugging Face's mask building; other attention kernels (flash,
        # flex) and sliding-window layers get the 2-D mask and build their own.
        self.use_bias = attn in _BIAS_ATTENTION and layer_types <= {"full_attention"}
        if static_cache and not self.use_bias:
            raise ValueError(f"static_cache=True needs sdpa or eager attention without sliding windows (model uses "
                             f"{attn!r}); load the model with attn_implementation='sdpa' or pass static_cache=False")
        self.static_cache = (cuda and self.use_bias) if static_cache is None else static_cache
        if cuda_graphs and not (cuda and self.static_cache):
            raise ValueError("cuda_graphs=True needs a CUDA model with the static cache (static_cache=True and "
                             "sdpa/eager attention); pass cuda_graphs=None or False")
        self.cuda_graphs = (cuda and self.static_cache) if cuda_graphs is None else cuda_graphs
        self.sync_every = sync_every or (8 if cuda else 1)
        self.prompt_bucket = prompt_bucket
        self.graph_cache_size = graph_cache_size
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._tensor_steps = False  # tests: run the graph-safe (device-counter) step eagerly
        self._pad_shapes = False  # tests: pad rows and prompt width as the graph path does, without graphs
        self.last_stats: dict[str, float] = {}

    # ---------------------------------------------------------------------------------------------
    def encode(self, prompts: list[str] | list[list[int]]) -> list[list[int]]:
        out = []
        for p in prompts:
            if isinstance(p, (list, tuple)):
                ids = list(p)
            else:  # text from a chat template already carries BOS: do not add a second one
                bos = getattr(self.tokenizer, "bos_token", None)
                ids = self.tokenizer(p, add_special_tokens=not (bos and p.startswith(bos))).input_ids
            if self.max_prompt_length and len(ids) > self.max_prompt_length:
                ids = ids[-self.max_prompt_length:]  # keep the end: it is what the response continues
            if not ids:
                raise ValueError("an empty prompt cannot be generated from; give at least one token")
            out.append(ids)
        return out

    @torch.no_grad()
    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams,
                 sample_ids: torch.Tensor | None = None, columns: dict[str, list[Any]] | None = None,
                 generator: torch.Generator | None = None) -> RolloutBatch:
        """One response per prompt. sample_ids [N] key the random streams (default 0..N-1)."""
        t0 = time.perf_counter()
        encoded = self.encode(prompts)
        n = len(encoded)
        sample_ids = torch.arange(n) if sample_ids is None else torch.as_tensor(sample_ids)
        order = sorted(range(n), key=lambda i: len(encoded[i]))  # bucket similar lengths together
        was_training = self.model.training
        self.model.eval()
        parts = []
        try:
            # inference mode: less per-op bookkeeping than no_grad; the indexing in `select` below copies every
            # tensor out into ordinary tensors, so callers may use them in autograd
            with torch.inference_mode():
                for lo in range(0, n, self.micro_batch_size):
                    idx = order[lo:lo + self.micro_batch_size]
                    parts.append(self._generate_micro([encoded[i] for i in idx], params, sample_ids[idx], generator))
        finally:
            self.model.train(was_training)
        batch = RolloutBatch.concat(parts, pad_token_id=self.pad_id)
        inverse = torch.empty(n, dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(n)
        batch = batch.select(inverse.to(batch.response_ids.device))
        ids = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        texts = dict(zip(ids, self.tokenizer.batch_decode([list(prompts[i]) for i in ids]))) if ids else {}
        batch.prompts = [texts.get(i, p) for i, p in enumerate(prompts)]
        batch.completions = self.decode_responses(batch.response_ids, batch.mask)
        batch.columns = dict(columns or {})
        tokens = float(batch.mask.sum())
        elapsed = time.perf_counter() - t0
        self.last_stats = {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / max(elapsed, 1e-9)}
        return batch

    def decode_responses(self, response_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        rows = [[t for t, k in zip(r, m) if k] for r, m in zip(response_ids.tolist(), mask.tolist())]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def clear_graphs(self) -> None:
        """Drop captured CUDA graphs and their KV caches (e.g. after replacing the model's parameters)."""
        self._graphs.clear()

    # ---------------------------------------------------------------------------------------------
    def _stop_ids(self, params: SamplingParams) -> list[int]:
        return sorted(set(params.stop_token_ids) | set(self._eos_ids(params)))

    def _eos_ids(self, params: SamplingParams) -> list[int]:
        """The tokenizer's EOS ids that end a row (none with `ignore_eos`)."""
        eos = self.tokenizer.eos_token_id
        if params.ignore_eos or eos is None:
            return []
        return list(eos) if isinstance(eos, list) else [eos]

    def _vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    def _model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _forward(self, input_ids, mask, position_ids, cache) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _generate_micro(self, prompts: list[list[int]], params: SamplingParams, sample_ids: torch.Tensor,
                        generator: torch.Generator | None) -> RolloutBatch:
        dev, b = self.device, len(prompts)
        # a graph replays RNG ops of the default generator; another generator must be registrable with it
        graphs = self.cuda_graphs and (generator is None or self.counter_noise
                                       or hasattr(torch.cuda.CUDAGraph, "register_generator_state"))
        pad = graphs or self._pad_shapes
        rows = _next_pow2(b) if pad else b  # padded rows start finished
        width = max(len(p) for p in prompts)
        if pad:
            width = _round_up(width, self.prompt_bucket)
        prompt_ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        prompt_mask = torch.zeros((rows, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            prompt_ids[i, width - len(p):] = torch.tensor(p)
            prompt_mask[i, width - len(p):] = 1
        prompt_mask[b:, -1] = 1  # pad rows: one visible token, so their attention stays finite
        prompt_ids, prompt_mask = prompt_ids.to(dev), prompt_mask.to(dev)
        keys = None
        if self.counter_noise:
            keys = torch.zeros(rows, dtype=torch.int64)
            keys[:b] = sample_keys(params.seed, sample_ids)
            keys = keys.to(dev)

        stop_ids = self._stop_ids(params)
        T = params.max_new_tokens
        sampler = _Sampler(self, params, stop_ids, generator)
        entry = None
        if graphs:
            key = (rows, width, T, sampler.signature, self.counter_noise, id(generator), self._weights_key())
            entry = self._graphs.get(key)
            if entry is not None:
                self._graphs.move_to_end(key)
                sampler = entry.sampler  # the graph reads this sampler's tensors
        state = entry.state if entry is not None else self._new_state(rows, width, T, keys is not None)
        self._reset_state(state, prompt_mask, keys, b)

        positions = position_ids_from_mask(prompt_mask)
        if self.use_bias:
            prefill_mask = self._prefill_bias(prompt_mask, state.bias.shape[-1] if state.static else width)
        else:
            prefill_mask = self._mask_2d(state, width)
        logits = self._forward(prompt_ids, prefill_mask, positions, state.cache)
        state.positions.copy_(positions[:, -1] + 1)
        state.col.fill_(width)
        host_steps = not (graphs or self._tensor_steps)
        sampler.sample_record(state, logits, 0 if host_steps else None)

        t, checked = 1, 0
        while t < T:
            if t - checked >= self.sync_every:
                checked = t
                if self._check(state, params, t):
                    break
            if graphs:
                if entry is None:  # first use of this shape: one eager step (warm-up), then capture
                    entry = self._capture(state, sampler)
                    self._graphs[key] = entry
                    self._graphs.move_to_end(key)
                    while len(self._graphs) > self.graph_cache_size:
                        self._graphs.popitem(last=False)
                else:
                    entry.graph.replay()
            else:
                self._decode_step(state, sampler, t if host_steps else None)
            t += 1
        self._check(state, params, t, stop_strings=False)
        real = max(len(p) for p in prompts)
        return self._collect(state, b, t, params, prompt_ids[:b, width - real:], prompt_mask[:b, width - real:])

    # ---------------------------------------------------------------------------------------------
    def _weights_key(self) -> tuple:
        """Graphs hold raw pointers to the parameters: re-capture when any parameter was reallocated."""
        return tuple(p.data_ptr() for p in self.model.parameters())

    def _new_state(self, rows: int, width: int, T: int, counter: bool) -> _DecodeState:
        from transformers import DynamicCache, StaticCache

        dev, length = self.device, width + T
        if self.static_cache:
            length = _round_up(length, 16)  # aligned bias rows keep sdpa on its memory-efficient CUDA kernel
        config = self.model.config
        cache = StaticCache(config=config, max_cache_len=length) if self.static_cache else DynamicCache(config=config)
        v = self._vocab_size()

        def zeros(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=dev)

        return _DecodeState(
            cache=cache, bias=zeros(rows, 1, 1, length, dtype=self._model_dtype()),
            tokens=zeros(rows), positions=zeros(rows), step=zeros(1), col=zeros(1),
            finished=zeros(rows, dtype=torch.bool), bad=zeros(rows, dtype=torch.bool),
            out_tokens=zeros(rows, T), out_logp=zeros(rows, T, dtype=torch.float32),
            out_slp=zeros(rows, T, dtype=torch.float32), out_hit=zeros(rows, T, dtype=torch.bool),
            out_live=zeros(rows, T, dtype=torch.bool),
            keys=zeros(rows) if counter else None,
            cols=torch.arange(v, device=dev) if counter else None, width=width, static=self.static_cache)

    def _reset_state(self, state: _DecodeState, prompt_mask: torch.Tensor, keys: torch.Tensor | None,
                     b: int) -> None:
        """Fill the (possibly reused) buffers for a new micro-batch, in place: graphs hold their addresses."""
        width = state.width
        state.cache.reset()
        neg = torch.finfo(state.bias.dtype).min
        state.bias.fill_(neg)
        state.bias[:, 0, 0, :width].masked_fill_(prompt_mask.bool(), 0.0)
        state.step.zero_()
        state.finished.zero_()
        state.finished[b:] = True
        state.bad.zero_()
        if keys is not None:
            state.keys.copy_(keys)

    def _prefill_bias(self, prompt_mask: torch.Tensor, length: int) -> torch.Tensor:
        """[b, 1, P, length] additive bias: causal over the prompt, padding hidden, cache columns >= P hidden."""
        rows, width = prompt_mask.shape
        dtype = self._model_dtype()
        causal = torch.ones(width, width, dtype=torch.bool, device=prompt_mask.device).tril()
        allowed = causal[None] & prompt_mask.bool()[:, None, :]
        bias = torch.full((rows, 1, width, length), torch.finfo(dtype).min, dtype=dtype, device=prompt_mask.device)
        bias[:, 0, :, :width].masked_fill_(allowed, 0.0)
        return bias

    def _mask_2d(self, state: _DecodeState, length: int) -> torch.Tensor:
        return (state.bias[:, 0, 0, :length] == 0).long()

    def _decode_step(self, state: _DecodeState, sampler: "_Sampler", t: int | None) -> None:
        """Forward the last sampled token and sample the next. t: host step (CPU), or None to read every
        position from the device counters (graph-safe: the same ops on every call, no host values)."""
        state.bias.index_fill_(-1, state.col, 0.0)  # the incoming token's own cache column becomes visible
        if not state.static and t is None:
            raise RuntimeError("the device-counter decode step needs the static cache")
        if not self.use_bias:
            length = state.width + t
            mask = self._mask_2d(state, state.bias.shape[-1] if state.static else length)
        elif state.static:
            mask = state.bias
        else:
            mask = state.bias[..., :state.width + t]
        logits = self._forward(state.tokens[:, None], mask, state.positions[:, None], state.cache)
        state.positions.add_(1)
        state.col.add_(1)
        sampler.sample_record(state, logits, t)

    def _capture(self, state: _DecodeState, sampler: "_Sampler") -> _Graph:
        """Run one decode step eagerly on a side stream (warm-up: Triton compilation, cuBLAS workspaces), then
        capture the next step; the capture records without executing, so the state is one step on."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._decode_step(state, sampler, None)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if sampler.generator is not None and hasattr(graph, "register_generator_state"):
            graph.register_generator_state(sampler.generator)
        with torch.cuda.graph(graph):
            self._decode_step(state, sampler, None)
        return _Graph(graph, state, sampler)

    def _check(self, state: _DecodeState, params: SamplingParams, t: int, stop_strings: bool = True) -> bool:
        """Host sync: raise on invalid logits; True when every row is finished (stop tokens or strings)."""
        done, bad = torch.stack([state.finished.all(), state.bad.any()]).tolist()
        if bad:
            raise FloatingPointError("the model produced NaN/inf logits during generation; no token could be sampled")
        if done:
            return True
        if stop_strings and params.stop and (self.sync_every > 1 or t % 4 == 0):
            return self._hit_stop_strings(state, t, params.stop)
        return False

    def _collect(self, state: _DecodeState, b: int, t: int, params: SamplingParams, prompt_ids: torch.Tensor,
                 prompt_mask: torch.Tensor) -> RolloutBatch:
        live = state.out_live[:b, :t]
        used = int(live.any(0).nonzero().max()) + 1  # graphs may run past the step where every row finished
        mask = live[:, :used].long()
        response_ids = state.out_tokens[:b, :used]
        stopped_by_string = None
        if params.stop:
            mask, stopped_by_string = self._truncate_at_stop_strings(response_ids, mask, params.stop)
        keep = mask.bool()
        return RolloutBatch(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask,
            response_ids=torch.where(keep, response_ids, self.pad_id), mask=mask,
            logprobs=torch.where(keep, state.out_logp[:b, :used], 0.0),
            sampling_logprobs=torch.where(keep, state.out_slp[:b, :used], 0.0),
            topk_hit=state.out_hit[:b, :used] & keep,
            stop_reason=self._stop_reasons(response_ids, mask, params, stopped_by_string),
        )

    def _stop_reasons(self, response_ids: torch.Tensor, mask: torch.Tensor, params: SamplingParams,
                      stopped_by_string: torch.Tensor | None) -> torch.Tensor:
        """[b] int64 codes (rollouts.batch.STOP_REASONS) from each row's last kept token: an EOS token -> eos,
        another stop token or a stop string in the text -> stop, otherwise the row ran to max_new_tokens -> length."""
        lengths = mask.sum(-1)
        last = response_ids.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
        reason = torch.full_like(last, STOP_LENGTH)
        eos = self._eos_ids(params)
        stop_ids = [i for i in params.stop_token_ids if i not in eos]
        if stop_ids:
            reason = torch.where(torch.isin(last, torch.tensor(stop_ids, device=last.device)), STOP_STRING, reason)
        if eos:
            reason = torch.where(torch.isin(last, torch.tensor(eos, device=last.device)), STOP_EOS, reason)
        if stopped_by_string is not None:
            reason = torch.where(stopped_by_string.to(last.device), STOP_STRING, reason)
        return reason.to(torch.long)

    def _hit_stop_strings(self, state: _DecodeState, t: int, stops: list[str]) -> bool:
        """Mark rows whose text so far contains a stop string as finished; True when all rows are."""
        ids, live = state.out_tokens[:, :t].cpu(), state.out_live[:, :t].cpu()
        finished = state.finished.cpu()
        for i, text in enumerate(self.decode_responses(ids, live)):
            if not finished[i] and any(s in text for s in stops):
                finished[i] = True
        state.finished.copy_(finished)
        return bool(finished.all())

    def _truncate_at_stop_strings(self, response_ids, mask, stops) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep each row up to and including the token that completes its first stop string; also returns
        [b] bool, the rows whose text contains a stop string."""
        mask = mask.clone()
        hit = torch.zeros(response_ids.shape[0], dtype=torch.bool)
        for i in range(response_ids.shape[0]):
            ids = response_ids[i][mask[i].bool()].tolist()
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if not any(s in text for s in stops):
                continue
            hit[i] = True
            for cut in range(1, len(ids) + 1):
                if any(s in self.tokenizer.decode(ids[:cut], skip_special_tokens=True) for s in stops):
                    mask[i, cut:] = 0
                    break
        return mask, hit


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
            self.scalar = ScalarSampler(vocab, params.temperature, params.top_k, params.top_p, params.min_p, dev)
        self.noise_chunk: tuple[int, torch.Tensor] | None = None  # (first step, [b, S, V]) on the host path
        self.signature = (params.temperature, params.top_k, params.top_p, params.min_p, tuple(stop_ids),
                          params.min_new_tokens, tuple(params.allowed_token_ids or ()), engine.sampler_backend,
                          engine.gate_top_k, engine.pad_id)

    def _noise(self, state: _DecodeState, logits: torch.Tensor, t: int | None) -> torch.Tensor | None:
        if state.keys is None or self.greedy:
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
            out = kernels.sample(sampling_logits, p.temperature, p.top_k, p.top_p, p.min_p, generator=self.generator,
                                 noise=noise, return_details=True, backend=self.engine.sampler_backend)
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
