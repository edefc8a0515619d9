"""The one batch type that carries a training step through its phases."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

# Why a row stopped; RolloutBatch.stop_reason holds the code (the index here), rewards receive the name.
# "tool_call": a row paused at a tool call (a segment's end inside an episode; never a finished row's reason).
# The last three end a multi-turn tool episode (align.rollouts.episodes) at a limit: rollout.max_turns,
# rollout.max_tool_calls, or the total response length (policy + observation tokens) in rollout.max_new_tokens.
STOP_REASONS = ("eos", "stop", "length", "tool_call", "max_turns", "max_tool_calls", "max_length")
(STOP_EOS, STOP_STRING, STOP_LENGTH, STOP_TOOL_CALL, STOP_MAX_TURNS, STOP_MAX_TOOL_CALLS,
 STOP_MAX_LENGTH) = range(len(STOP_REASONS))


@dataclass
class RolloutBatch:
    """N = B prompts x G samples, prompt-major ([p0s0, p0s1, ..., p1s0, ...]).

    prompt_ids:       [N, P] left-padded prompt token ids
    prompt_mask:      [N, P] 1 on real prompt tokens
    response_ids:     [N, T] right-padded response token ids (pad after the stop token)
    mask:             [N, T] 1 on response tokens (the stop/EOS token included), 0 on padding; in a tool
                      episode 1 on every response token present, policy-sampled and observation alike
    tool_mask:        [N, T] bool, 1 on observation tokens (appended by the environment, never sampled: their
                      logprobs / sampling_logprobs are 0; exclude them from losses); None without tools
    logprobs:         [N, T] sampled tokens' log-probs under the raw (temperature-1, untruncated) policy
    sampling_logprobs:[N, T] the same tokens' log-probs under the truncated sampling distribution
    topk_hit:         [N, T] bool, the sampled token was among the top-k (k = `gate_top_k`) of the sampling dist
    stop_reason:      [N] int64, why each row stopped, a code into STOP_REASONS: STOP_EOS (emitted an EOS
                      token), STOP_STRING (a stop string or a non-EOS stop token), STOP_LENGTH (reached
                      max_new_tokens: truncated); set by the engine for every row; a tool episode adds
                      STOP_MAX_TURNS / STOP_MAX_TOOL_CALLS / STOP_MAX_LENGTH (the limit that ended it)
    prompts / completions: decoded text, N each
    columns:          dataset columns for the reward functions, each a list of N; a tool episode adds
                      "trajectory": per sample the TRL-style messages of the response, [{"role": "assistant",
                      "content": str, "tool_calls": [{"type": "function", "function": {"name": str,
                      "arguments": dict}}]}, {"role": "tool", "name": str, "content": str}, ...]
    weights_version:  the policy version that generated the batch
    versions:         [N] int64, the weights version that drew each sample (its oldest token's, for a partial
                      rollout); None from a synchronous loop, where every sample is drawn by `weights_version`
    token_versions:   [N, T] int64, the weights version that drew each response token (partial rollouts)
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    sampling_logprobs: torch.Tensor | None = None
    topk_hit: torch.Tensor | None = None
    stop_reason: torch.Tensor | None = None
    prompts: list[str] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)
    columns: dict[str, list[Any]] = field(default_factory=dict)
    weights_version: int = 0
    versions: torch.Tensor | None = None
    token_versions: torch.Tensor | None = None
    tool_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def stop_reasons(self) -> list[str] | None:
        """Each row's stop reason by name ("eos", "stop", "length", ...), or None when the batch has none."""
        if self.stop_reason is None:
            return None
        return [STOP_REASONS[int(c)] for c in self.stop_reason.tolist()]

    @property
    def truncated(self) -> torch.Tensor | None:
        """[N] bool: the row hit max_new_tokens without stopping (stop reason "length", or "max_length" in a
        tool episode)."""
        if self.stop_reason is None:
            return None
        return (self.stop_reason == STOP_LENGTH) | (self.stop_reason == STOP_MAX_LENGTH)

    def reward_columns(self) -> dict[str, list[Any]]:
        """What a reward function receives as keyword arguments besides prompts and completions: the dataset
        columns, `completion_ids` (each response's token ids) and `stop_reason` (each row's stop reason name)."""
        # one device-to-host copy of each tensor, then Python slicing: no per-row GPU sync (2 per row before)
        ids, mask = self.response_ids.tolist(), self.mask.tolist()
        completion_ids = [[t for t, k in zip(row, m) if k] for row, m in zip(ids, mask)]
        out = {**self.columns, "completion_ids": completion_ids}
        if self.stop_reason is not None:
            out["stop_reason"] = self.stop_reasons
        return out

    @property
    def input_ids(self) -> torch.Tensor:
        """[N, P + T] prompt and response, for the teacher-forced forward pass."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.mask], dim=1)

    def to(self, device: torch.device | str) -> "RolloutBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def select(self, index: torch.Tensor | list[int]) -> "RolloutBatch":
        """Rows `index` of every tensor, list and column."""
        idx = torch.as_tensor(index, dtype=torch.long)
        rows = idx.tolist()
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = v[idx]
            elif isinstance(v, list):
                out[f.name] = [v[i] for i in rows] if v else v
            elif isinstance(v, dict):
                out[f.name] = {k: [c[i] for i in rows] for k, c in v.items()}
            else:
                out[f.name] = v
        return RolloutBatch(**out)

    @staticmethod
    def concat(batches: list["RolloutBatch"], pad_token_id: int = 0) -> "RolloutBatch":
        """Join batches in order; prompts are re-left-padded and responses re-right-padded to a common width."""
        if len(batches) == 1:
            return batches[0]
        P = max(b.prompt_ids.shape[1] for b in batches)
        T = max(b.response_ids.shape[1] for b in batches)

        def left(t, width, value):
            return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)

        def right(t, width, value):
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        out: dict[str, Any] = {
            "prompt_ids": torch.cat([left(b.prompt_ids, P, pad_token_id) for b in batches]),
            "prompt_mask": torch.cat([left(b.prompt_mask, P, 0) for b in batches]),
            "response_ids": torch.cat([right(b.response_ids, T, pad_token_id) for b in batches]),
            "mask": torch.cat([right(b.mask, T, 0) for b in batches]),
            "logprobs": torch.cat([right(b.logprobs, T, 0.0) for b in batches]),
        }
        for name in ("sampling_logprobs", "topk_hit"):
            if all(getattr(b, name) is not None for b in batches):
                out[name] = torch.cat([right(getattr(b, name), T, 0) for b in batches])
        if all(b.stop_reason is not None for b in batches):
            out["stop_reason"] = torch.cat([b.stop_reason for b in batches])
        if all(b.versions is not None for b in batches):
            out["versions"] = torch.cat([b.versions for b in batches])
        if all(b.token_versions is not None for b in batches):
            out["token_versions"] = torch.cat([right(b.token_versions, T, 0) for b in batches])
        masks = [b.tool_mask for b in batches if b.tool_mask is not None]
        if masks:  # a batch without tools: no observation token anywhere
            out["tool_mask"] = torch.cat([right(b.tool_mask if b.tool_mask is not None
                                                else torch.zeros_like(b.mask, dtype=masks[0].dtype), T, 0)
                                          for b in batches])
        out["prompts"] = [p for b in batches for p in b.prompts]
        out["completions"] = [c for b in batches for c in b.completions]
        keys = batches[0].columns.keys()
        out["columns"] = {k: [v for b in batches for v in b.columns[k]] for k in keys}
        out["weights_version"] = min(b.weights_version for b in batches)
        return RolloutBatch(**out)
