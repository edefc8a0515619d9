"""In-process generation with a KV cache: prompt bucketing, batched decode, per-row early stop.

Each micro-batch of similar-length prompts is left-padded, prefilled once, then decoded token by token
with the model's KV cache; the next token is drawn by `kernels.sample` (temperature -> top-k -> top-p ->
min-p), which also returns the token's log-prob under the raw policy (what the trainer recomputes), under
the truncated sampling distribution, and its rank (for the CD-RLHF top-k gate). Position ids come from
the attention mask exactly as in the trainer's teacher-forced pass, so the two agree.

Random draws are keyed by (run seed, global sample id, decode step) when `counter_noise` is on (the
default on CPU): a sample draws the same tokens whichever rows share its batch, so 1 or N rollout workers
and any bucketing give identical rollouts. On CUDA the faster generator path is the default.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

import kernels
from rollouts.batch import RolloutBatch
from rollouts.noise import sample_keys, uniform_noise
from rollouts.params import SamplingParams

_TINY = torch.finfo(torch.float32).tiny


def gumbel_from_uniform(u: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(u.clamp(_TINY, 1.0 - 2.0**-24)))


class RolloutEngine:
    def __init__(self, model: nn.Module, tokenizer, device: torch.device | str | None = None,
                 sampler_backend: str = "auto", micro_batch_size: int = 64, max_prompt_length: int | None = None,
                 gate_top_k: int = 1, counter_noise: bool | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.sampler_backend = sampler_backend
        self.micro_batch_size = micro_batch_size
        self.max_prompt_length = max_prompt_length
        self.gate_top_k = gate_top_k
        self.counter_noise = (self.device.type != "cuda") if counter_noise is None else counter_noise
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.last_stats: dict[str, float] = {}

    # ---------------------------------------------------------------------------------------------
    def encode(self, prompts: list[str] | list[list[int]]) -> list[list[int]]:
        out = []
        for p in prompts:
            ids = list(p) if isinstance(p, (list, tuple)) else self.tokenizer(p).input_ids
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
            for lo in range(0, n, self.micro_batch_size):
                idx = order[lo:lo + self.micro_batch_size]
                parts.append(self._generate_micro([encoded[i] for i in idx], params, sample_ids[idx], generator))
        finally:
            self.model.train(was_training)
        batch = RolloutBatch.concat(parts, pad_token_id=self.pad_id)
        inverse = torch.empty(n, dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(n)
        batch = batch.select(inverse)
        batch.prompts = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in prompts]
        batch.completions = self.decode_responses(batch.response_ids, batch.mask)
        batch.columns = dict(columns or {})
        tokens = float(batch.mask.sum())
        elapsed = time.perf_counter() - t0
        self.last_stats = {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / max(elapsed, 1e-9)}
        return batch

    def decode_responses(self, response_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        return [self.tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True)
                for row, m in zip(response_ids.cpu(), mask.cpu())]

    # ---------------------------------------------------------------------------------------------
    def _stop_ids(self, params: SamplingParams) -> list[int]:
        ids = list(params.stop_token_ids)
        eos = self.tokenizer.eos_token_id
        if not params.ignore_eos and eos is not None:
            ids += eos if isinstance(eos, list) else [eos]
        return sorted(set(ids))

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float(), out.past_key_values

    def _generate_micro(self, prompts: list[list[int]], params: SamplingParams, sample_ids: torch.Tensor,
                        generator: torch.Generator | None) -> RolloutBatch:
        from transformers import DynamicCache

        dev, b = self.device, len(prompts)
        width = max(len(p) for p in prompts)
        prompt_ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        prompt_mask = torch.zeros((b, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            prompt_ids[i, width - len(p):] = torch.tensor(p)
            prompt_mask[i, width - len(p):] = 1
        prompt_ids, prompt_mask = prompt_ids.to(dev), prompt_mask.to(dev)
        attention = prompt_mask.clone()
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        keys = sample_keys(params.seed, sample_ids).to(dev) if self.counter_noise else None

        stop_ids = torch.tensor(self._stop_ids(params), dtype=torch.long, device=dev)
        allowed_bias = None
        if params.allowed_token_ids is not None:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            allowed_bias = torch.full((vocab,), float("-inf"), device=dev)
            allowed_bias[torch.tensor(params.allowed_token_ids, device=dev)] = 0.0

        logits, cache = self._forward(prompt_ids, attention, positions, DynamicCache())
        next_pos = positions[:, -1] + 1
        finished = torch.zeros(b, dtype=torch.bool, device=dev)
        tokens_out, logp_out, slp_out, rank_out, mask_out = [], [], [], [], []
        for t in range(params.max_new_tokens):
            sampling_logits = logits if allowed_bias is None else logits + allowed_bias
            if t < params.min_new_tokens and stop_ids.numel():
                sampling_logits = sampling_logits.index_fill(1, stop_ids, float("-inf"))
            noise = gumbel_from_uniform(uniform_noise(keys, t, logits.shape[1])) if keys is not None else None
            out = kernels.sample(sampling_logits, params.temperature, params.top_k, params.top_p, params.min_p,
                                 generator=generator, noise=noise, return_details=True, backend=self.sampler_backend)
            token = out.tokens
            if (token < 0).any():
                raise FloatingPointError("the model produced NaN/inf logits during generation; no token could be sampled")
            raw_logp = out.logprobs
            if sampling_logits is not logits:  # the raw policy is the unmasked distribution
                raw_logp = logits.gather(1, token[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
            live = ~finished
            tokens_out.append(torch.where(live, token, torch.full_like(token, self.pad_id)))
            logp_out.append(torch.where(live, raw_logp, torch.zeros_like(raw_logp)))
            slp_out.append(torch.where(live, out.sampling_logprobs, torch.zeros_like(raw_logp)))
            rank_out.append(out.rank)
            mask_out.append(live.long())
            if stop_ids.numel():
                finished = finished | torch.isin(token, stop_ids)
            if bool(finished.all()):
                break
            if params.stop and t % 4 == 3 and self._hit_stop_strings(tokens_out, mask_out, params.stop, finished):
                break
            attention = torch.cat([attention, torch.ones((b, 1), dtype=attention.dtype, device=dev)], dim=1)
            logits, cache = self._forward(tokens_out[-1][:, None], attention, next_pos[:, None], cache)
            next_pos = next_pos + 1

        response_ids = torch.stack(tokens_out, 1)
        mask = torch.stack(mask_out, 1)
        if params.stop:
            mask = self._truncate_at_stop_strings(response_ids, mask, params.stop)
            response_ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, self.pad_id))
        keep = mask.bool()
        return RolloutBatch(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids, mask=mask,
            logprobs=torch.where(keep, torch.stack(logp_out, 1), 0.0),
            sampling_logprobs=torch.where(keep, torch.stack(slp_out, 1), 0.0),
            topk_hit=torch.stack(rank_out, 1) < self.gate_top_k,
        )

    def _hit_stop_strings(self, tokens_out, mask_out, stops, finished) -> bool:
        """Mark rows whose text so far contains a stop string as finished; True when all rows are."""
        ids, mask = torch.stack(tokens_out, 1).cpu(), torch.stack(mask_out, 1).cpu()
        for i, text in enumerate(self.decode_responses(ids, mask)):
            if any(s in text for s in stops):
                finished[i] = True
        return bool(finished.all())

    def _truncate_at_stop_strings(self, response_ids, mask, stops) -> torch.Tensor:
        """Keep each row up to and including the token that completes its first stop string."""
        mask = mask.clone()
        for i in range(response_ids.shape[0]):
            ids = response_ids[i][mask[i].bool()].tolist()
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if not any(s in text for s in stops):
                continue
            for cut in range(1, len(ids) + 1):
                if any(s in self.tokenizer.decode(ids[:cut], skip_special_tokens=True) for s in stops):
                    mask[i, cut:] = 0
                    break
        return mask
