"""The Themis trace format: `Thought / Action / Action Input / Observation` blocks, rendered and parsed.

Rendered (PAPERS.md §1):
  <start_tool> Thought: ...\nAction: name\nAction Input: input\n<start_observation> Observation: ...\n
  [... more rounds ...] <start_work> Work: rationale
Parsing tolerates the model's slips: missing special tokens, numbered keys ('Action 1:'), extra spaces or
blank lines, 'Action Input' on the same line, a missing final newline, and trailing text after Finished.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

START_TOOL, START_OBS, START_WORK = "<start_tool>", "<start_observation>", "<start_work>"
NO_TOOL = "Thought: Do I need to use a tool? No\nFinished."
# The Themis inference regex (PAPERS.md), applied to one block.
ACTION_RE = re.compile(r"Action\s*\d*\s*:[\s]*(.*?)[\s]*Action\s*\d*\s*Input\s*\d*\s*:[\s]*(.*)", re.DOTALL)
_THOUGHT = re.compile(r"Thought\s*\d*\s*:", re.IGNORECASE)
_OBS = re.compile(r"(?:<start_observation>\s*)?Observation\s*\d*\s*:", re.IGNORECASE)
_WORK = re.compile(r"(?:<start_work>\s*)?Work\s*:", re.IGNORECASE)
_TOKENS = re.compile(r"</?s>|<start_tool>|<start_observation>|<start_work>")


@dataclass
class ToolCall:
    action: str
    action_input: str
    thought: str = ""
    observation: str | None = None


@dataclass
class ParsedTrace:
    calls: list[ToolCall]
    finished: bool
    rationale: str | None


def render_call(call: ToolCall, special_tokens: bool = True) -> str:
    head = f"{START_TOOL} " if special_tokens else ""
    text = f"{head}Thought: {call.thought}\nAction: {call.action}\nAction Input: {call.action_input}\n"
    if call.observation is not None:
        text += render_observation(call.observation, special_tokens)
    return text


def render_observation(observation: str, special_tokens: bool = True) -> str:
    return f"{START_OBS + ' ' if special_tokens else ''}Observation: {observation}\n"


def render_trace(calls: list[ToolCall], rationale: str | None = None, special_tokens: bool = True) -> str:
    """The assistant part of a Themis sequence: the tool rounds, then 'Work: rationale' when given.
    No calls renders the no-tool trace ('Thought: Do I need to use a tool? No\\nFinished.')."""
    text = "".join(render_call(c, special_tokens) for c in calls) if calls else NO_TOOL + "\n"
    if rationale is not None:
        text += f"{START_WORK + ' ' if special_tokens else ''}Work: {rationale}"
    return text


def parse_action(text: str) -> tuple[str, str] | None:
    """(action, action_input) of the LAST tool request in `text` (generation stopped at <start_observation>),
    or None when the text holds no request / says Finished."""
    calls = parse_trace(text).calls
    if not calls or calls[-1].observation is not None:
        return None
    return calls[-1].action, calls[-1].action_input


def is_finished(text: str) -> bool:
    """True when the model says it needs no (more) tools."""
    body = _TOKENS.sub(" ", text)
    return bool(re.search(r"\bFinished\b", body)) or bool(re.search(r"use a tool\?\s*No\b", body, re.IGNORECASE))


def parse_trace(text: str) -> ParsedTrace:
    """All tool rounds in a trace (dict-free, tolerant)."""
    if not isinstance(text, str):
        return ParsedTrace([], False, None)
    work = _WORK.search(text)
    rationale = None
    if work:
        rationale = _TOKENS.sub("", text[work.end():]).strip()
        text = text[: work.start()]
    starts = [m.start() for m in _THOUGHT.finditer(text)]
    # blocks begin at each 'Thought:'; text before the first one may still hold an Action (a slip)
    bounds = ([0] if not starts or starts[0] > 0 else []) + starts + [len(text)]
    calls: list[ToolCall] = []
    for a, b in zip(bounds, bounds[1:]):
        block = text[a:b]
        obs_m = _OBS.search(block)
        head, obs = (block[: obs_m.start()], block[obs_m.end():]) if obs_m else (block, None)
        m = ACTION_RE.search(_TOKENS.sub("\n", head))
        if not m:
            continue
        thought_m = _THOUGHT.search(head)
        thought = ""
        if thought_m:
            thought = re.split(r"\n\s*Action\s*\d*\s*:", head[thought_m.end():], maxsplit=1)[0]
            thought = _TOKENS.sub("", thought).strip()
        action = m.group(1).strip().strip("`'\"").strip()
        action_input = _TOKENS.sub("", m.group(2)).strip()
        if obs is not None:
            obs = _TOKENS.sub("", obs).strip()
        calls.append(ToolCall(action=action, action_input=action_input, thought=thought, observation=obs))
    return ParsedTrace(calls, is_finished(text), rationale)


def calls_from_tara(actions) -> list[ToolCall]:
    """TARA's `actions` field (one dict, or the multi-round text) as ToolCalls."""
    if isinstance(actions, dict):
        return [ToolCall(actions.get("Action", ""), actions.get("Action Input", ""), actions.get("Thought", ""),
                         actions.get("Observation"))]
    if isinstance(actions, str):
        return parse_trace(actions).calls
    return []


__all__ = ["ToolCall", "ParsedTrace", "render_trace", "render_call", "render_observation", "parse_trace",
           "parse_action", "is_finished", "calls_from_tara", "ACTION_RE", "NO_TOOL", "START_TOOL", "START_OBS",
           "START_WORK"]
