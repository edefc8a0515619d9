"""Preference records in TRL's formats: explicit prompt (`prompt` / `chosen` / `rejected`) or implicit prompt
(`chosen` / `rejected` only, each the whole text or conversation, sharing the prompt as a common prefix), as
strings or as chat-message lists. Rendered to the text pairs the reward-model trainer scores."""
from __future__ import annotations

from typing import Any

from align.rewards.base import completion_text


def _is_messages(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "content" in m for m in x)


def render_messages(messages: list[dict[str, Any]]) -> str:
    """A prompt's messages as `role: content` lines (the RM's tokenizer sees plain text, as with string pairs)."""
    return "".join(f"{m.get('role', 'user')}: {m['content']}\n" for m in messages)


def split_implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) from two full texts / conversations: the prompt is their longest common
    prefix of characters / messages (TRL's `extract_prompt` rule: a space that ends the prefix stays with the
    completions)."""
    if isinstance(chosen, str) != isinstance(rejected, str) or _is_messages(chosen) != _is_messages(rejected):
        raise ValueError("chosen and rejected must both be strings or both be lists of chat messages")
    n = min(len(chosen), len(rejected))
    idx = n
    for i in range(n):
        if chosen[i] != rejected[i]:
            idx = i
            break
    if isinstance(chosen, str) and idx > 0 and chosen[idx - 1] == " ":
        idx -= 1
    return chosen[:idx], chosen[idx:], rejected[idx:]


def preference_texts(rec: dict[str, Any]) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) as text from an explicit- or implicit-prompt record (strings or messages)."""
    if "chosen" not in rec or "rejected" not in rec:
        raise ValueError(f"a preference record needs chosen and rejected (and prompt, or the prompt as their common "
                         f"prefix); got keys {sorted(rec)}")
    prompt = rec.get("prompt", rec.get("question"))
    chosen, rejected = rec["chosen"], rec["rejected"]
    if prompt is None:
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
        if not prompt:
            raise ValueError("a preference record without a prompt column needs chosen and rejected to share the "
                             "prompt as a common prefix; these share nothing: add a prompt column")
    prompt_text = render_messages(prompt) if _is_messages(prompt) else str(prompt)
    return prompt_text, _completion(chosen), _completion(rejected)


def _completion(x: Any) -> str:
    if _is_messages(x):
        return "".join(str(m["content"]) for m in x)  # the assistant turn(s) after the prompt
    return completion_text(x)
