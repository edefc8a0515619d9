"""Partial rollouts: responses generated in segments of a token budget, so a weight update between two segments
cuts the unfinished rows and they continue under the new weights (AReaL's interruptible generation, verl's
partial rollouts; docs/async.md "Partial rollouts").

The rule, which the tests pin against a token-by-token reference:
- A segment decodes at most `chunk` tokens per unfinished row with the weights loaded at its start. A row that
  stops (EOS, stop token, stop string) or reaches `max_new_tokens` is finished; the others continue.
- A continuation is a new engine call on (prompt + prefix) as the prompt: the prefix's KV cache is recomputed
  under the new weights (a fresh prefill, as verl and SGLang do after a weight update), never reused from the
  old weights. Positions are those of the uninterrupted sequence (the prompt is the same left-padded text).
- The prefix tokens keep the log-probs and the weights version they were drawn with: the behaviour policy of a
  token is the version that sampled it (`RolloutBatch.token_versions`), so a rollout correction compares each
  token's trainer log-prob with the log-prob of the policy that actually drew it. A sample's version
  (`RolloutBatch.versions`, what the staleness bound checks) is its oldest token's.
- Random draws: segment j of sample s is keyed by sample id s + j * SEGMENT_STRIDE (counter noise), so a partial
  rollout is reproducible but draws other numbers than an uninterrupted one would after the first segment.
- min_new_tokens counts the whole response (a continuation suppresses stop tokens for what is left of it); a
  stop string spanning a segment boundary is found on the joined text, which is truncated as the engine does.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from align.rollouts import stops
from align.rollouts.batch import STOP_LENGTH, RolloutBatch
from align.rollouts.params import SamplingParams

SEGMENT_STRIDE = 1 << 40  # sample ids of later segments: far above any run's sample count


@torch.no_grad()
def generate_partial(engine, prompts: list[str] | list[list[int]], params: SamplingParams, chunk: int, version: int,
                     next_version: Callable[[], int], sample_ids: torch.Tensor | None = None,
                     columns: dict[str, list[Any]] | None = None) -> RolloutBatch:
    """One response per prompt, decoded `chunk` tokens at a time; `next_version()` is called between segments
    (it may load newer weights into the engine's model) and returns the version the next segment samples with.
    The engine must not be used by another thread meanwhile (its max_prompt_length is lifted for continuations:
    the prompt was truncated once, the prefix must not be)."""
    if chunk < 1:
        raise ValueError(f"chunk = {chunk}: must be >= 1")
    encoded = engine.encode(prompts)
    n = len(encoded)
    sample_ids = torch.arange(n) if sample_ids is None else torch.as_tensor(sample_ids).to(torch.long)
    tokens: list[list[int]] = [[] for _ in range(n)]
    logp: list[list[float]] = [[] for _ in range(n)]
    slogp: list[list[float]] = [[] for _ in range(n)]
    hits: list[list[bool]] = [[] for _ in range(n)]
    versions: list[list[int]] = [[] for _ in range(n)]
    live, used, segment = list(range(n)), 0, 0
    saved_max, engine.max_prompt_length = engine.max_prompt_length, None
    try:
        while live:
            budget = min(chunk, params.max_new_tokens - used)
            seg_params = dataclasses.replace(params, max_new_tokens=budget,
                                             min_new_tokens=min(budget, max(0, params.min_new_tokens - used)))
            out = engine.generate([encoded[i] + tokens[i] for i in live], seg_params,
                                  sample_ids=sample_ids[live] + segment * SEGMENT_STRIDE)
            still = []
            for j, i in enumerate(live):
                keep = out.mask[j].bool()
                got = out.response_ids[j][keep].tolist()
                tokens[i] += got
                logp[i] += out.logprobs[j][keep].tolist()
                slogp[i] += out.sampling_logprobs[j][keep].tolist()
                hits[i] += out.topk_hit[j][keep].tolist()
                versions[i] += [version] * len(got)
                if int(out.stop_reason[j]) == STOP_LENGTH and len(tokens[i]) < params.max_new_tokens:
                    still.append(i)  # cut at the budget: continues in the next segment
            used += budget
            live, segment = still, segment + 1
            if live:
                version = int(next_version())
    finally:
        engine.max_prompt_length = saved_max
    return _assemble(engine, prompts, encoded, params, tokens, logp, slogp, hits, versions, columns)


def _assemble(engine, prompts, encoded, params, tokens, logp, slogp, hits, versions, columns) -> RolloutBatch:
    n, pad = len(encoded), engine.pad_id
    P, T = max(len(p) for p in encoded), max(len(t) for t in tokens)
    prompt_ids = torch.full((n, P), pad, dtype=torch.long)
    prompt_mask = torch.zeros((n, P), dtype=torch.long)
    response_ids = torch.full((n, T), pad, dtype=torch.long)
    mask = torch.zeros((n, T), dtype=torch.long)
    out_lp, out_slp = torch.zeros((n, T)), torch.zeros((n, T))
    out_hit = torch.zeros((n, T), dtype=torch.bool)
    token_versions = torch.zeros((n, T), dtype=torch.long)
    for i in range(n):
        p, k = len(encoded[i]), len(tokens[i])
        prompt_ids[i, P - p:] = torch.tensor(encoded[i])
        prompt_mask[i, P - p:] = 1
        response_ids[i, :k] = torch.tensor(tokens[i], dtype=torch.long)
        mask[i, :k] = 1
        out_lp[i, :k] = torch.tensor(logp[i])
        out_slp[i, :k] = torch.tensor(slogp[i])
        out_hit[i, :k] = torch.tensor(hits[i], dtype=torch.bool)
        token_versions[i, :k] = torch.tensor(versions[i], dtype=torch.long)
    stopped_by_string = None
    if params.stop:  # a stop string may span a segment boundary: check the joined text, as the engine does
        mask, stopped_by_string = stops.truncate_at_stop_strings(engine.tokenizer, response_ids, mask, params.stop)
    keep = mask.bool()
    reason = stops.stop_reasons(engine.tokenizer, response_ids, mask, params, stopped_by_string)
    big = torch.iinfo(torch.long).max
    batch = RolloutBatch(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=torch.where(keep, response_ids, pad), mask=mask,
        logprobs=torch.where(keep, out_lp, 0.0), sampling_logprobs=torch.where(keep, out_slp, 0.0),
        topk_hit=out_hit & keep, stop_reason=reason, token_versions=torch.where(keep, token_versions, 0),
        versions=torch.where(keep, token_versions, big).min(-1).values)
    texts = [p if isinstance(p, str) else None for p in prompts]
    decoded = engine.tokenizer.batch_decode([list(p) for p, t in zip(prompts, texts) if t is None]) if None in texts else []
    it = iter(decoded)
    batch.prompts = [t if t is not None else next(it) for t in texts]
    batch.completions = engine.decode_responses(batch.response_ids, batch.mask)
    batch.columns = dict(columns or {})
    batch.weights_version = int(batch.versions.min())
    return batch
