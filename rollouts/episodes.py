"""Multi-turn tool episodes over `RolloutEngine.generate`, token-in token-out (docs/tool_use.md).

One episode per prompt. Each turn is one engine call on the live rows' (prompt + response so far) token ids:
- Rows decode together; a row that ends its turn (end-of-turn token for Hermes, the stop string
  "Observation:" for Themis) is finished in that call while the others keep decoding.
- When the call returns, every row whose turn holds a tool call has its calls parsed and run concurrently on
  a bounded pool with per-call timeouts (`CallRunner`); a malformed call, an unknown tool, a tool error or
  timeout becomes an observation that says so.
- The observation is appended as token ids (template pieces tokenised normally, tool output with special
  tokens split), and the row resumes in the next call from (prompt + response + observation). As in
  rollouts/partial.py the prefix's KV cache is recomputed by a fresh prefill every turn, never carried over.
- Observation positions are marked in `tool_mask`, stay 1 in `mask`, and have log-prob 0 (never sampled).

Limits (each row's stop_reason names the one that ended it): `max_turns` policy turns (a call in the last
allowed turn is not run: STOP_MAX_TURNS), `max_tool_calls` calls per episode (a turn whose calls would pass
it is not run: STOP_MAX_TOOL_CALLS; with `end_at_max_tool_calls` the episode ends as soon as the observation of
its last allowed call is appended, for a reader that has nothing to wait for after it), and
`params.max_new_tokens` total response tokens, policy and observation together (an observation that does not
fit, or a turn cut after an observation: STOP_MAX_LENGTH; a row that never called a tool and runs out keeps the
engine's STOP_LENGTH). `max_observation_tokens` caps each tool output (cut with a marker). Random draws of turn
j of sample s are keyed by s + j * SEGMENT_STRIDE.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from align.rollouts import stops
from align.rollouts.batch import (
    STOP_EOS,
    STOP_LENGTH,
    STOP_MAX_LENGTH,
    STOP_MAX_TOOL_CALLS,
    STOP_MAX_TURNS,
    STOP_STRING,
    RolloutBatch,
)
from align.rollouts.environment import CallRunner, Environment
from align.rollouts.params import SamplingParams
from align.rollouts.partial import SEGMENT_STRIDE
from align.rollouts.tool_formats import decode_turn


@dataclass
class EpisodeLimits:
    max_turns: int = 8
    max_tool_calls: int = 16
    max_observation_tokens: int = 512
    end_at_max_tool_calls: bool = False  # end right after the last allowed call's observation (STOP_MAX_TOOL_CALLS)

    def __post_init__(self):
        for k in ("max_turns", "max_tool_calls", "max_observation_tokens"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"rollout.{k} = {getattr(self, k)}: must be >= 1")


@dataclass
class _Row:
    prompt: list[int]
    state: Any
    ids: list[int] = dataclasses.field(default_factory=list)
    logp: list[float] = dataclasses.field(default_factory=list)
    slogp: list[float] = dataclasses.field(default_factory=list)
    hits: list[bool] = dataclasses.field(default_factory=list)
    tool: list[bool] = dataclasses.field(default_factory=list)
    messages: list[dict] = dataclasses.field(default_factory=list)
    turns: int = 0
    calls: int = 0
    reason: int = STOP_EOS

    def add(self, ids, logp=None, slogp=None, hits=None, tool=False):
        n = len(ids)
        self.ids += ids
        self.logp += logp if logp is not None else [0.0] * n
        self.slogp += slogp if slogp is not None else [0.0] * n
        self.hits += hits if hits is not None else [False] * n
        self.tool += [tool] * n


@torch.no_grad()
def generate_episodes(engine, prompts: list[str] | list[list[int]], params: SamplingParams, fmt, env: Environment,
                      limits: EpisodeLimits | None = None, runner: CallRunner | None = None,
                      sample_ids: torch.Tensor | None = None, columns: dict[str, list[Any]] | None = None) -> RolloutBatch:
    """One tool episode per prompt; see the module docstring. The engine must not be used by another thread
    meanwhile (its max_prompt_length is lifted for continuations, as in generate_partial)."""
    limits = limits or EpisodeLimits()
    own_runner = runner is None
    runner = runner or CallRunner()
    cols = dict(columns or {})
    encoded = engine.encode(prompts)
    n = len(encoded)
    sample_ids = torch.arange(n) if sample_ids is None else torch.as_tensor(sample_ids).to(torch.long)
    rows = [_Row(p, env.reset({k: v[i] for k, v in cols.items()})) for i, p in enumerate(encoded)]
    budget_total = params.max_new_tokens
    live, turn = list(range(n)), 0
    saved_max, engine.max_prompt_length = engine.max_prompt_length, None
    try:
        while live:
            budget = max(budget_total - len(rows[i].ids) for i in live)
            seg = dataclasses.replace(params, max_new_tokens=budget, stop=list(params.stop) + list(fmt.stop),
                                      min_new_tokens=min(budget, params.min_new_tokens) if turn == 0 else 0)
            out = engine.generate([rows[i].prompt + rows[i].ids for i in live], seg,
                                  sample_ids=sample_ids[live] + turn * SEGMENT_STRIDE)
            paused = []
            for j, i in enumerate(live):
                row, keep = rows[i], out.mask[j].bool()
                got = out.response_ids[j][keep].tolist()
                room = budget_total - len(row.ids)
                reason = int(out.stop_reason[j])
                if len(got) > room:  # the call's budget is the largest row's: cut this row at its own
                    got, reason = got[:room], STOP_LENGTH
                k = len(got)
                row.add(got, out.logprobs[j][keep].tolist()[:k], out.sampling_logprobs[j][keep].tolist()[:k],
                        out.topk_hit[j][keep].tolist()[:k])
                row.turns += 1
                text = decode_turn(engine.tokenizer, got, getattr(fmt, "markup", ()))
                calls = fmt.parse(text) if reason != STOP_LENGTH and fmt.wants_call(text, reason == STOP_STRING) else []
                msg = {"role": "assistant", "content": fmt.content(text)}
                if calls:
                    msg["tool_calls"] = [c.message() for c in calls]
                row.messages.append(msg)
                if not calls:
                    row.reason = STOP_MAX_LENGTH if reason == STOP_LENGTH and any(row.tool) else reason
                elif row.turns >= limits.max_turns:
                    row.reason = STOP_MAX_TURNS
                elif row.calls + len(calls) > limits.max_tool_calls:
                    row.reason = STOP_MAX_TOOL_CALLS
                else:
                    paused.append((i, calls, got[-1] if got else None))
            jobs = [(env, rows[i].state, c, rows[i].messages) for i, calls, _ in paused for c in calls]
            outputs = iter(runner.run(jobs))
            live = []
            for i, calls, last in paused:
                row = rows[i]
                results = [(c.name, next(outputs)) for c in calls]
                row.calls += len(calls)
                last_text = engine.tokenizer.decode([last]) if last in stops.stop_ids(engine.tokenizer, params) else ""
                ids, shown = fmt.observation(results, last_text, limits.max_observation_tokens)
                if len(row.ids) + len(ids) >= budget_total:  # no room left for the policy to read it
                    row.reason = STOP_MAX_LENGTH
                    continue
                row.add(ids, tool=True)
                row.messages += [{"role": "tool", "name": name, "content": s} for (name, _), s in zip(results, shown)]
                if limits.end_at_max_tool_calls and row.calls >= limits.max_tool_calls:
                    row.reason = STOP_MAX_TOOL_CALLS  # nothing the policy writes next would be run or read
                    continue
                live.append(i)
            turn += 1
    finally:
        engine.max_prompt_length = saved_max
        if own_runner:
            runner.close()
    return _assemble(engine, prompts, rows, cols)


def _assemble(engine, prompts, rows: list[_Row], columns: dict) -> RolloutBatch:
    n, pad = len(rows), engine.pad_id
    P, T = max(len(r.prompt) for r in rows), max(1, max(len(r.ids) for r in rows))
    prompt_ids = torch.full((n, P), pad, dtype=torch.long)
    prompt_mask = torch.zeros((n, P), dtype=torch.long)
    response_ids = torch.full((n, T), pad, dtype=torch.long)
    mask = torch.zeros((n, T), dtype=torch.long)
    logp, slogp = torch.zeros((n, T)), torch.zeros((n, T))
    hits, tool = torch.zeros((n, T), dtype=torch.bool), torch.zeros((n, T), dtype=torch.bool)
    for i, r in enumerate(rows):
        p, k = len(r.prompt), len(r.ids)
        prompt_ids[i, P - p:] = torch.tensor(r.prompt)
        prompt_mask[i, P - p:] = 1
        if k:
            response_ids[i, :k] = torch.tensor(r.ids, dtype=torch.long)
            mask[i, :k] = 1
            logp[i, :k], slogp[i, :k] = torch.tensor(r.logp), torch.tensor(r.slogp)
            hits[i, :k], tool[i, :k] = torch.tensor(r.hits), torch.tensor(r.tool)
    batch = RolloutBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids, mask=mask,
                         logprobs=logp, sampling_logprobs=slogp, topk_hit=hits,
                         stop_reason=torch.tensor([r.reason for r in rows], dtype=torch.long), tool_mask=tool)
    texts = [p if isinstance(p, str) else None for p in prompts]
    decoded = iter(engine.tokenizer.batch_decode([list(p) for p, t in zip(prompts, texts) if t is None])
                   if None in texts else [])
    batch.prompts = [t if t is not None else next(decoded) for t in texts]
    batch.completions = engine.decode_responses(batch.response_ids, batch.mask)
    batch.columns = {**columns, "trajectory": [r.messages for r in rows]}
    return batch
