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
from typing import Any

import torch
from torch import nn

from align.algos.positions import position_ids_from_mask
from align.kernels.health import startup_backend
from align.rollouts import stops
from align.rollouts.batch import RolloutBatch
from align.rollouts.decode_state import _DecodeState, _Graph  # noqa: F401  (tests build _Graph)
from align.rollouts.hf_cache import cache_keyword
from align.rollouts.noise import sample_keys
from align.rollouts.params import SamplingParams
from align.rollouts.sampler import ScalarSampler, _Sampler, counter_gumbel, gumbel_from_uniform  # noqa: F401

_BIAS_ATTENTION = ("sdpa", "eager")  # attention implementations that take our additive 4-D bias as is


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


class RolloutEngine:
    """Generate one response per prompt with a KV-cached model; see the module docstring.

    device: where the model runs (default: its parameters' device). sampler_backend: "auto" (Triton on CUDA,
    ScalarSampler on CPU), "triton" or "torch" (kernels.sample with that backend).
    micro_batch_size: rows decoded together. max_prompt_length: keep only the last this-many prompt tokens.
    gate_top_k: `topk_hit` = the sampled token is among the top-k of the sampling distribution (curiosity's
        gate); 0 = nobody reads it (all False, and the sampler computes no rank); 1 costs nothing extra.
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
        self.sampler_backend = startup_backend(sampler_backend, self.device)  # F7: Triton launch probe on CUDA
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size = {micro_batch_size}: must be >= 1")
        self.micro_batch_size = micro_batch_size
        self.max_prompt_length = max_prompt_length
        if isinstance(gate_top_k, bool) or int(gate_top_k) != gate_top_k or gate_top_k < 0:
            raise ValueError(f"gate_top_k={gate_top_k!r} must be an integer >= 0 (0: no topk_hit)")
        self.gate_top_k = int(gate_top_k)
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
        self._cache_kw = cache_keyword(model)

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
    def _vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    def _model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _forward(self, input_ids, mask, position_ids, cache) -> torch.Tensor:
        # `cache` (transformers >= 5.24) or `past_key_values` (older 5.x), read off the forward's signature;
        # the keyword is a Python constant per model class, so CUDA-graph capture and replay see one call shape
        kw = {self._cache_kw: cache}
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=1, **kw)
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

        stop_ids = stops.stop_ids(self.tokenizer, params)
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
        state.stop_scanned = 0
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
            mask, stopped_by_string = stops.truncate_at_stop_strings(self.tokenizer, response_ids, mask, params.stop)
        keep = mask.bool()
        return RolloutBatch(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask,
            response_ids=torch.where(keep, response_ids, self.pad_id), mask=mask,
            logprobs=torch.where(keep, state.out_logp[:b, :used], 0.0),
            sampling_logprobs=torch.where(keep, state.out_slp[:b, :used], 0.0),
            topk_hit=state.out_hit[:b, :used] & keep,
            stop_reason=stops.stop_reasons(self.tokenizer, response_ids, mask, params, stopped_by_string),
        )

    def _hit_stop_strings(self, state: _DecodeState, t: int, strings: list[str]) -> bool:
        """Mark rows whose text so far contains a stop string as finished; True when all rows are. Each scan
        decodes only the tokens since the last scan plus a look-back (`stops.stop_lookback`): earlier
        occurrences were found by earlier scans, so the whole history is never re-decoded (GPU_READINESS F12)."""
        start = max(0, state.stop_scanned - stops.stop_lookback(strings))
        ids, live = state.out_tokens[:, start:t].cpu(), state.out_live[:, start:t].cpu()
        finished = state.finished.cpu()
        for i, text in enumerate(self.decode_responses(ids, live)):
            if not finished[i] and any(s in text for s in strings):
                finished[i] = True
        state.stop_scanned = t
        state.finished.copy_(finished)
        return bool(finished.all())
