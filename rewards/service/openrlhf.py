"""OpenRLHF's `/get_reward`: splitting `query` (prompt + response) into the response, and what an errored
sample becomes (`on_error`). OpenRLHF's client does `torch.tensor(body["rewards"])` and retries any non-2xx
answer a few times before raising, so `rewards` must hold numbers only and an errored sample must be an
error status, never a silent null or zero (docs/rewards.md, "OpenRLHF").

The prefix rule (`split_query`), in order:
1. the query starts with the prompt: the response is the rest;
2. the prompt starts within the first MAX_PREFIX_CHARS characters of the query (a BOS or other special token
   the client's decode kept, e.g. "<s>" or "<|begin_of_text|>"): the response is what follows it;
3. the prompt was cut short (OpenRLHF truncates prompts to `prompt_max_len` tokens): the response follows
   the longest prefix of the prompt that the query holds, starting within MAX_PREFIX_CHARS, when that prefix
   is at least MIN_TRUNCATED_CHARS long (a response that happens to begin with the prompt's next
   characters loses them: the text cannot tell them apart);
4. otherwise the sample is an error ("query[i] does not contain prompts[i]") and follows `on_error`, so one
   odd sample never fails a whole batch with 422.
"""
from __future__ import annotations

import math
from typing import Any

MAX_PREFIX_CHARS = 64  # longer than any tokenizer's BOS / special-token run
MIN_TRUNCATED_CHARS = 16  # a shorter shared start is too weak to say where the prompt ended


def parse_on_error(value: str) -> float | None:
    """'fail' -> None (an errored sample fails the batch); 'value:X' -> X (finite) fills it."""
    if value == "fail":
        return None
    if value.startswith("value:"):
        try:
            fill = float(value[len("value:"):])
        except ValueError:
            fill = math.nan
        if math.isfinite(fill):
            return fill
    raise ValueError(f"service: on_error must be 'fail' or 'value:X' with X a finite number (e.g. value:0), "
                     f"got {value!r}")


def split_query(query: str, prompt: str) -> str | None:
    """The response inside `query` by the module's prefix rule; None when the query holds no prompt."""
    if query.startswith(prompt):
        return query[len(prompt):]
    at = query.find(prompt, 0, MAX_PREFIX_CHARS + len(prompt))
    if at != -1:
        return query[at + len(prompt):]
    best_at, best_len = -1, 0
    for at in range(min(MAX_PREFIX_CHARS, len(query)) + 1):
        n = _common_prefix(query, at, prompt)
        if n > best_len:
            best_at, best_len = at, n
    if best_len >= min(MIN_TRUNCATED_CHARS, len(prompt)) and best_len > 0:
        return query[best_at + best_len:]
    return None


def _common_prefix(text: str, start: int, prompt: str) -> int:
    n, limit = 0, min(len(text) - start, len(prompt))
    while n < limit and text[start + n] == prompt[n]:
        n += 1
    return n


def split_queries(queries: list[str], prompts: list[str] | None) -> tuple[list[str], list[str], list[str | None]]:
    """(prompts, completions, errors): a query with no prompt in it gets an error and an empty completion."""
    if prompts is None:
        return [""] * len(queries), list(queries), [None] * len(queries)
    completions, errors = [], []
    for i, (q, p) in enumerate(zip(queries, prompts)):
        response = split_query(q, p)
        completions.append("" if response is None else response)
        errors.append(None if response is not None else
                      f"query[{i}] does not contain prompts[{i}] (see the prefix rule in docs/rewards.md)")
    return list(prompts), completions, errors


def trace_texts(infos: list[Any], limit: int) -> list[str]:
    """Each sample's trace (info["trace"], or a mixture component's), cut to `limit` chars; "" when none."""
    out = []
    for info in infos:
        text = _trace_of(info) or ""
        out.append(text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more chars]")
    return out


def _trace_of(info: Any) -> str | None:
    if not isinstance(info, dict):
        return None
    if isinstance(info.get("trace"), str):
        return info["trace"]
    for sub in (info.get("component_info") or {}).values():
        if (found := _trace_of(sub)) is not None:
            return found
    return None


def get_reward_body(scores: list[float | None], errors: list[str | None], fill: float | None,
                    request_id: str, traces: list[str] | None = None) -> dict[str, Any] | tuple[int, str]:
    """The 200 body, or (status, detail) when a sample errored and `fill` is None (on_error: fail).
    `traces` (serve --trace-chars N) adds extra_logs.trace, one text per sample."""
    bad = [i for i, (s, e) in enumerate(zip(scores, errors)) if e is not None or s is None]
    if bad and fill is None:
        i = bad[0]
        why = errors[i] or "the reward gave no score"
        return 500, (f"{len(bad)} of {len(scores)} samples errored (first: sample {i}: {why})"[:400]
                     + "; rewards must all be numbers, so the batch fails: fix the reward or serve with "
                       "--on-error value:X to fill X and count them in extra_logs.reward_error")
    bad_set = set(bad)
    rewards = [fill if i in bad_set else float(s) for i, s in enumerate(scores)]
    flags = [1.0 if i in bad_set else 0.0 for i in range(len(scores))]
    errors = [e if e is not None or i not in bad_set else "the reward gave no score" for i, e in enumerate(errors)]
    # extra_logs values are per-sample lists: OpenRLHF concatenates them across requests and splits per sample
    extra_logs: dict[str, list[Any]] = {"reward_error": flags}
    if traces is not None:
        extra_logs["trace"] = traces
    return {"rewards": rewards, "scores": rewards, "extra_logs": extra_logs,
            "errors": errors, "errors_filled": len(bad), "request_id": request_id}
