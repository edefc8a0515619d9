"""The Themis trace format, in one place: special tokens, the Action regex, the step type, renderers, parsers.

Rendered (PAPERS.md §1):
  <start_tool> Thought: ...\nAction: name\nAction Input: input\n<start_observation> Observation: ...\n
  [... more rounds ...] <start_work> Work: rationale

Three readers of one format, each for its own input:
- `parse_trace` / `parse_action`: a model's generations. Tolerant of slips: missing special tokens, numbered
  keys ('Action 1:'), extra spaces or blank lines, 'Action Input' on the same line, a missing final newline,
  and trailing text after Finished; fields are stripped.
- `parse_action_block`: the released Themis inference parser (generate_themis.py `parse_actions`) on one
  `<start_tool>` block, as the Themis reward model's trace loop runs it.
- `parse_tara_actions`: TARA's recorded `actions` field, verbatim (the released training code's reading), so
  rendered training text keeps the data's exact whitespace. `calls_from_tara` is the tolerant reading of the
  same field (tool replay).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

START_TOOL = "<start_tool>"
START_OBSERVATION = "<start_observation>"
START_WORK = "<start_work>"
THEMIS_SPECIAL_TOKENS = (START_TOOL, START_OBSERVATION, START_WORK)
NO_TOOL_TRACE = "Thought: Do I need to use a tool? No\nFinished."
TOOL_FAILED_OBSERVATION = "An error occurred during the tool invoke, so no result was returned."
# The Themis inference regex (released generate_themis.py parse_actions, quoted in PAPERS.md), on one block.
ACTION_RE = re.compile(r"Action\s*\d*\s*:[\s]*(.*?)[\s]*Action\s*\d*\s*Input\s*\d*\s*:[\s]*(.*)", re.DOTALL)
# One recorded TARA step (released training code): fields verbatim, the observation runs to the next Thought.
TARA_STEP_RE = re.compile(
    r"Thought:[ \t]*(?P<thought>.*?)\nAction:[ \t]*(?P<action>.*?)\nAction Input:[ \t]*(?P<input>.*?)"
    r"\nObservation:[ \t]*(?P<obs>.*?)(?=\nThought:|\Z)",
    re.DOTALL,
)
_THOUGHT = re.compile(r"Thought\s*\d*\s*:", re.IGNORECASE)
_OBS = re.compile(rf"(?:{re.escape(START_OBSERVATION)}\s*)?Observation\s*\d*\s*:", re.IGNORECASE)
_WORK = re.compile(rf"(?:{re.escape(START_WORK)}\s*)?Work\s*:", re.IGNORECASE)
_TOKENS = re.compile("|".join([r"</?s>", *map(re.escape, THEMIS_SPECIAL_TOKENS)]))


@dataclass
class ToolCall:
    """One tool round: the request (thought, action, action input) and, once run, its observation."""

    action: str
    action_input: str
    thought: str = ""
    observation: str | None = None


@dataclass
class ParsedTrace:
    calls: list[ToolCall]
    finished: bool
    rationale: str | None


# ----- rendering -------------------------------------------------------------------------------------------

def render_call(call: ToolCall, special_tokens: bool = True, final_newline: bool = True) -> str:
    """'<start_tool> Thought: t\\nAction: A\\nAction Input: I\\n[<start_observation> Observation: O\\n]'.
    final_newline=False drops the last line break (TARA's released rendering joins steps with '\\n')."""
    head = f"{START_TOOL} " if special_tokens else ""
    text = f"{head}Thought: {call.thought}\nAction: {call.action}\nAction Input: {call.action_input}\n"
    if call.observation is not None:
        text += render_observation(call.observation, special_tokens)
    return text if final_newline else text[:-1]


def render_observation(observation: str, special_tokens: bool = True) -> str:
    return f"{START_OBSERVATION + ' ' if special_tokens else ''}Observation: {observation}\n"


def render_trace(calls: list[ToolCall], rationale: str | None = None, special_tokens: bool = True) -> str:
    """The assistant part of a Themis sequence: the tool rounds, then 'Work: rationale' when given.
    No calls renders the no-tool trace ('Thought: Do I need to use a tool? No\\nFinished.')."""
    text = "".join(render_call(c, special_tokens) for c in calls) if calls else NO_TOOL_TRACE + "\n"
    if rationale is not None:
        text += f"{START_WORK + ' ' if special_tokens else ''}Work: {rationale}"
    return text


# ----- parsing model output ----------------------------------------------------------------------------------

def parse_action(text: str) -> tuple[str, str] | None:
    """(action, action_input) of the LAST tool request in `text` (generation stopped at <start_observation>),
    or None when the text holds no request / says Finished."""
    calls = parse_trace(text).calls
    if not calls or calls[-1].observation is not None:
        return None
    return calls[-1].action, calls[-1].action_input


def parse_action_block(block: str) -> tuple[str, str] | None:
    """The released Themis parser on one tool block: (action, input), or None. The input loses surrounding
    spaces and double quotes (kept for SQL: 'SELECT ...'); the action is only stripped."""
    m = ACTION_RE.search(block)
    if not m:
        return None
    action = m.group(1).strip()
    tool_input = m.group(2).strip(" ").strip()
    if not tool_input.startswith("SELECT "):
        tool_input = tool_input.strip('"')
    return action, tool_input


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


# ----- TARA's recorded traces --------------------------------------------------------------------------------

def calls_from_tara(actions) -> list[ToolCall]:
    """TARA's `actions` field (one dict, or the multi-round text) as ToolCalls, read tolerantly (tool replay)."""
    if isinstance(actions, dict):
        return [ToolCall(actions.get("Action", ""), actions.get("Action Input", ""), actions.get("Thought", ""),
                         actions.get("Observation"))]
    if isinstance(actions, str):
        return parse_trace(actions).calls
    return []


def normalize_actions_text(text: str) -> str:
    """The released code's clean-up of string-form traces."""
    return text.replace("\n\n", "\n").replace("Thought: \n", "Thought: ")


def parse_tara_actions(actions: Any) -> tuple[tuple[ToolCall, ...], str | None]:
    """TARA `actions` (a dict for one call, or a 'Thought/Action/Action Input/Observation' string) -> (steps,
    None), or ((), the raw trace) when no tool was used; fields verbatim, as the released training code reads
    them. Raises ValueError on anything else."""
    if isinstance(actions, dict):
        step = ToolCall(thought=str(actions["Thought"]), action=str(actions["Action"]),
                        action_input=str(actions["Action Input"]), observation=str(actions["Observation"]))
        return (step,), None
    if not isinstance(actions, str):
        raise ValueError(f"TARA actions must be a dict or a string, got {type(actions).__name__}")
    text = normalize_actions_text(actions).strip()
    if "Action:" not in text:
        return (), text
    steps = tuple(ToolCall(thought=m["thought"], action=m["action"], action_input=m["input"], observation=m["obs"])
                  for m in TARA_STEP_RE.finditer(text))
    if not steps:
        raise ValueError(f"cannot parse a TARA trace: {text[:80]!r}")
    return steps, None


__all__ = ["ToolCall", "ParsedTrace", "render_trace", "render_call", "render_observation", "parse_trace",
           "parse_action", "parse_action_block", "is_finished", "calls_from_tara", "parse_tara_actions",
           "normalize_actions_text", "ACTION_RE", "TARA_STEP_RE", "NO_TOOL_TRACE", "TOOL_FAILED_OBSERVATION",
           "START_TOOL", "START_OBSERVATION", "START_WORK", "THEMIS_SPECIAL_TOKENS"]
