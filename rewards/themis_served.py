"""The `themis` reward kind: a Themis checkpoint scored by Ray reward workers and by `align serve-rewards`.

    reward: {functions: [{name: themis, kwargs: {model_path: runs/themis-rm, tool_timeout_s: 10, max_rounds: 3}}]}

`ServedThemis` wraps `ThemisRewardModel` for processes other than the one that configured it:
- the checkpoint is loaded on first use, in the process that scores: a Ray reward actor loads it itself (on its
  own device), so the weights never travel through the driver or Ray's object store, and a driver on a GPU
  machine does not pickle CUDA tensors to a CPU-only reward actor; the same object rebuilt from its pickle
  (a restarted actor, the service's replacement for a stuck reward) loads it again;
- every tool call gets `tool_timeout_s` (ThemisRewardModel's call runner, rewards/themis_traces.py): a tool
  that hangs ends as a failed call (tool_calls[i]: ok False, the error says it timed out; the trace shows that
  observation) and the request still completes; `max_rounds` is the per-sample tool budget.

`score` returns ThemisRewardModel's output: info[i] holds the sample's "trace" (the assistant part: calls,
observations, rationale), "tool_calls" (one record per call) and "rationale" (the text after "Work:", read off
the trace when the trace loop does not set it), which `/score` returns as `info` and `/get_reward` as
`extra_logs.trace` (with `--trace-chars N`).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

from align.errors import MissingFileError
from align.rewards.base import RewardFunction, RewardOutput

DEFAULT_TOOL_TIMEOUT_S = 30.0  # the rollout engine's tool_timeout_s default


class ServedThemis(RewardFunction):
    """model_path: a directory written by save_themis / `align train-rm` with model.kind: themis.
    tool_timeout_s: per tool call; tools: None (the tools package's registry), a {name: tool} mapping or a
    callable name -> tool. Other keyword arguments go to ThemisRewardModel (max_rounds, max_new_tokens,
    max_length, batch_size, max_workers, device, or model= and tokenizer= for an in-memory model)."""

    name = "themis"

    def __init__(self, model_path: str | None = None, *, tool_timeout_s: float = DEFAULT_TOOL_TIMEOUT_S,
                 tools: Any = None, **kwargs: Any):
        if model_path is None and "model" not in kwargs:
            raise ValueError("the themis reward needs model_path: a Themis checkpoint (align train-rm with model.kind: themis)")
        if model_path is not None and not (Path(model_path) / "v_head.safetensors").is_file():
            # at configuration time, not at the first score on a remote worker
            raise MissingFileError(f"{model_path} is not a Themis checkpoint (no v_head.safetensors); train one with "
                                   "`align train-rm` and model.kind: themis")
        if not tool_timeout_s > 0:
            raise ValueError(f"the themis reward's tool_timeout_s must be > 0, got {tool_timeout_s}")
        self.model_path, self.kwargs = model_path, {**kwargs, "tool_timeout_s": float(tool_timeout_s)}
        self.tools = tools
        self._rm = None
        self._lock = threading.Lock()

    def reward_model(self):
        """The ThemisRewardModel, built on first use in this process."""
        with self._lock:
            if self._rm is None:
                from align.rewards.themis import ThemisRewardModel

                self._rm = ThemisRewardModel(self.model_path, tools=self.tools, **self.kwargs)
            return self._rm

    def score(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> RewardOutput:
        out = self.reward_model().score(prompts, completions, **columns)
        for info in out.info:
            if isinstance(info, dict) and "rationale" not in info and isinstance(info.get("trace"), str):
                from align.tools.trace import parse_trace

                # a trace loop that keeps the rationale only inside the trace: the response names it anyway
                info["rationale"] = parse_trace(info["trace"]).rationale
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_rm"], state["_lock"] = None, None  # the receiving process loads its own copy
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._rm is not None:
                self._rm.close()
            self._rm = None


__all__ = ["ServedThemis", "DEFAULT_TOOL_TIMEOUT_S"]
