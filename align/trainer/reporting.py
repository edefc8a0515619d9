"""What the trainer reports beside the step scalars: TRL's per-reward-function metrics and completions tables.

Each reward of the mixture gets `rewards/<fn>/mean` and `rewards/<fn>/std` (TRL's keys) over the samples it
scored this step (errored or not-applicable samples are left out, as TRL's nanmean does). Every
`logging.completions_every` steps the first `logging.completions_rows` samples are logged with their prompt,
completion, mixed reward, each function's score, the error if any, and the reward's trace (Themis records
it as info["trace"]), each text bounded so that a policy cannot blow up the log.
"""
from __future__ import annotations

import math
from typing import Any

from align.trainer.state import StepData

TEXT_LIMIT = 4000  # chars kept of each prompt / completion / trace in a completions table


def bounded(text: Any, limit: int = TEXT_LIMIT) -> str | None:
    if text is None:
        return None
    text = text if isinstance(text, str) else str(text)
    return text if len(text) <= limit else f"{text[:limit]}... [{len(text) - limit} more chars]"


def reward_function_metrics(infos: list[dict]) -> dict[str, float]:
    """rewards/<fn>/mean and /std (unbiased, 0 for one sample) from the mixture's info["components"]."""
    per_fn: dict[str, list[float]] = {}
    for info in infos or []:
        for name, score in ((info or {}).get("components") or {}).items():
            if score is not None and math.isfinite(float(score)):
                per_fn.setdefault(name, []).append(float(score))
    out: dict[str, float] = {}
    for name, values in per_fn.items():
        n = len(values)
        if not n:  # a function that scored no sample of this step has no mean: its keys are absent
            continue
        mean = sum(values) / n
        out[f"rewards/{name}/mean"] = mean
        out[f"rewards/{name}/std"] = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return out


def trace_of(info: Any) -> str | None:
    """The reward's trace text: info["trace"], or the first component's under a mixture's component_info."""
    if not isinstance(info, dict):
        return None
    if isinstance(info.get("trace"), str):
        return info["trace"]
    for sub in (info.get("component_info") or {}).values():
        found = trace_of(sub)
        if found is not None:
            return found
    return None


def completion_rows(step: StepData, n_rows: int) -> list[dict[str, Any]]:
    batch, infos = step.batch, step.reward_info or []
    rows = []
    for i in range(min(n_rows, len(batch.completions))):
        info = infos[i] if i < len(infos) else {}
        valid = step.valid is None or bool(step.valid[i])
        rows.append({"prompt": bounded(batch.prompts[i]), "completion": bounded(batch.completions[i]),
                     "reward": float(step.scores[i]) if step.scores is not None and valid else None,
                     "rewards": dict((info or {}).get("components") or {}),
                     "error": bounded(next(iter(((info or {}).get("component_errors") or {}).values()), None)),
                     "trace": bounded(trace_of(info))})
    return rows


def log_completions(logger: Any, logging_cfg: Any, step_number: int, step: StepData) -> None:
    """Every logging.completions_every steps (0 = never), a completions table for this step."""
    every = logging_cfg.completions_every
    if every and step_number % every == 0:
        logger.log_completions(step_number, completion_rows(step, logging_cfg.completions_rows))
