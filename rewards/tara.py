"""TARA (the Themis paper's tool-augmented reward data): loading and rendering.

Each line of a TARA file is one preference pair: a question (optional context, optional `test_list`) and a
positive and a negative answer, each with the tool trace a verifier agent produced (`actions`) and its
rationale (`score_agent.explanation`). Data: the folder passed as `root=` or $ALIGN_TARA_DIR
(`align.tools.data.tara_dir`); see its README.

Rendering follows the released Themis code (ernie-research/Tool-Augmented-Reward-Model, main.py):
  "### USER:\n[Context: c\n]Question: q\nAnswer: a\n### ASSISTANT:\n"
  + "\n".join(steps) where a step is "<start_tool> Thought: t\nAction: A\nAction Input: I\n<start_observation> Observation: O"
  + "\n<start_work> Work: {rationale}" + EOS
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from align.errors import MissingFileError
from align.tools.data import tara_dir
from align.tools.trace import (
    NO_TOOL_TRACE,
    START_OBSERVATION,
    START_TOOL,
    START_WORK,
    THEMIS_SPECIAL_TOKENS,
    TOOL_FAILED_OBSERVATION,
    ToolCall,
    normalize_actions_text,
    parse_tara_actions,
    render_call,
)

# `parse_actions` is the TARA reader's historical name.
parse_actions = parse_tara_actions

# tool group -> (train file or None, test file); the group is what per-tool accuracy is reported by.
TARA_FILES: dict[str, tuple[str | None, str]] = {
    "calendar": ("agent_calendar_train.json", "agent_calendar_test.json"),
    "weather": ("agent_weather_train.json", "agent_weather_test.json"),
    "multi_tools": ("agent_multi_tools_train_action.json", "agent_multi_tools_test_action.json"),
    "calculator": ("agent_calculator_train_cases.json", "agent_calculator_test.json"),
    "code": ("regenerate_code_train_data.json", "reserve_code_test_data.json"),
    "hh_rlhf": ("hh_rlhf_train.json", "hh_rlhf_test.json"),
    "translator": (None, "agent_translator_test.json"),
    "wikisearch": (None, "agent_wikisearch_test_obs.json"),
    "webgpt": (None, "agent_webgpt_test_case.json"),
}

@dataclass(frozen=True)
class TaraAnswer:
    answer: str
    score: float
    steps: tuple[ToolCall, ...]
    rationale: str
    no_tool_trace: str | None = None  # the raw trace when no tool was used ("Thought: ... No\nFinished.")

    def render_trace(self) -> str:
        """The assistant's tool part (no rationale), as the released code writes it."""
        if self.steps:
            return "\n".join(render_call(step, final_newline=False) for step in self.steps)
        return f"{START_TOOL} {self.no_tool_trace or NO_TOOL_TRACE}"


@dataclass(frozen=True)
class TaraItem:
    id: str
    group: str
    question: str
    pos: TaraAnswer
    neg: TaraAnswer
    context: str | None = None
    test_list: tuple[str, ...] | None = None

    def as_context(self, side: str = "pos") -> dict[str, Any]:
        """The dict a tool receives as `context` (the sample being judged)."""
        ans = self.pos if side == "pos" else self.neg
        ctx: dict[str, Any] = {"id": self.id, "question": self.question, "answer": ans.answer}
        if self.context is not None:
            ctx["context"] = self.context
        if self.test_list is not None:
            ctx["test_list"] = list(self.test_list)
        return ctx


def _answer(raw: dict[str, Any]) -> TaraAnswer:
    steps, no_tool = parse_actions(raw["actions"])
    return TaraAnswer(
        answer=str(raw["answer"]),
        score=float(raw["score"]),
        steps=steps,
        rationale=str(raw["score_agent"]["explanation"]).strip(),
        no_tool_trace=no_tool,
    )


def parse_item(raw: dict[str, Any], group: str) -> TaraItem:
    tests = raw.get("test_list")
    return TaraItem(
        id=str(raw["id"]),
        group=group,
        question=str(raw["question"]),
        pos=_answer(raw["pos_answer"]),
        neg=_answer(raw["neg_answer"]),
        context=raw.get("context"),
        test_list=tuple(tests) if tests is not None else None,
    )


def load_tara_file(path: str | Path, group: str | None = None, limit: int | None = None) -> list[TaraItem]:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"TARA file {path} not found; set ALIGN_TARA_DIR to the folder holding the TARA data")
    group = group or _group_of(path.name)
    items = []
    with path.open() as fh:
        for line in fh:
            if line.strip():
                items.append(parse_item(json.loads(line), group))
                if limit is not None and len(items) >= limit:
                    break
    return items


def _group_of(filename: str) -> str:
    for group, files in TARA_FILES.items():
        if filename in files:
            return group
    return Path(filename).stem


def load_tara(groups: str | Iterable[str], split: str, limit: int | None = None, root: str | Path | None = None) -> list[TaraItem]:
    """Items of the named tool groups (e.g. "calendar", "weather") for split "train" or "test"."""
    if split not in ("train", "test"):
        raise ValueError(f"TARA split must be 'train' or 'test', got {split!r}")
    wanted: list[tuple[str, str]] = []
    for group in [groups] if isinstance(groups, str) else list(groups):
        if group not in TARA_FILES:
            raise ValueError(f"unknown TARA group {group!r}; choose from {', '.join(TARA_FILES)}")
        name = TARA_FILES[group][0 if split == "train" else 1]
        if name is None:
            raise ValueError(f"TARA group {group!r} has no train split; use it for evaluation only")
        wanted.append((group, name))
    root = tara_dir(root)
    items: list[TaraItem] = []
    for group, name in wanted:
        items.extend(load_tara_file(root / name, group, limit))
    return items


def load_weather_cache(root: str | Path | None = None) -> dict[str, str]:
    return json.loads((tara_dir(root) / "weather_history.json").read_text())


# ----- rendering -----------------------------------------------------------------------------------------

def render_user(question: str, answer: str, context: str | None = None) -> str:
    """The USER part, ending with the line break before '### ASSISTANT:'."""
    lines = ["### USER:"] + ([f"Context: {context}"] if context is not None else []) + [f"Question: {question}", f"Answer: {answer}"]
    return "\n".join(lines) + "\n"


PLAIN_TEMPLATE = "Question: {prompt}\nAnswer: {completion}"  # render_plain without a context, as a reward template


def render_plain(question: str, answer: str, context: str | None = None) -> str:
    """The plain RM input (released code's `linear` reward type): '[Context: c\\n]Question: q\\nAnswer: a'."""
    prefix = f"Context: {context}\n" if context is not None else ""
    return prefix + PLAIN_TEMPLATE.format(prompt=question, completion=answer)


@dataclass(frozen=True)
class ThemisSegments:
    """A rendered Themis sequence (without EOS) and the character spans the loss masks refer to.

    text[:question_end] is the USER header + context + question; text[:user_end] the whole USER part;
    observation_spans are (start, end) of each observation's text after its <start_observation> token;
    work_span is the rationale's span ("<start_work> Work: ...") or None.
    """

    text: str
    question_end: int
    user_end: int
    observation_spans: tuple[tuple[int, int], ...] = field(default_factory=tuple)
    work_span: tuple[int, int] | None = None


def render_themis(question: str, answer: str, trace: TaraAnswer | Sequence[ToolCall] | None, rationale: str | None,
                  context: str | None = None, include_rationale: bool = True) -> ThemisSegments:
    """The full Themis training sequence (EOS is appended by the tokenizer step)."""
    user = render_user(question, answer, context)
    question_end = len(user) - len(f"Answer: {answer}\n")
    text = user + "### ASSISTANT:\n"
    obs_spans = []
    if isinstance(trace, TaraAnswer):
        steps, no_tool = trace.steps, trace.no_tool_trace
    else:
        steps, no_tool = tuple(trace or ()), None
    if steps:
        for i, step in enumerate(steps):
            if i:
                text += "\n"
            head = render_call(step, final_newline=False)
            obs_start = len(text) + head.index(START_OBSERVATION) + len(START_OBSERVATION)
            text += head
            obs_spans.append((obs_start, len(text)))
    else:
        text += f"{START_TOOL} {no_tool or NO_TOOL_TRACE}"
    work_span = None
    if include_rationale and rationale is not None:
        text += "\n"
        start = len(text)
        text += f"{START_WORK} Work: {rationale.strip()}"
        work_span = (start, len(text))
    return ThemisSegments(text, question_end, len(user), tuple(obs_spans), work_span)


def render_item(item: TaraItem, side: str, include_rationale: bool = True, steps: Sequence[ToolCall] | None = None) -> ThemisSegments:
    """One side ("pos" | "neg") of a TARA item as a Themis sequence; `steps` replaces the gold trace."""
    ans = item.pos if side == "pos" else item.neg
    trace: TaraAnswer | Sequence[ToolCall] = ans if steps is None else steps
    return render_themis(item.question, ans.answer, trace, ans.rationale, item.context, include_rationale)


def replay_steps(item: TaraItem, side: str, call_tool) -> tuple[ToolCall, ...]:
    """The gold trace with each Observation replaced by what `call_tool(action, input, context)` returns.

    Multi-step traces feed nothing forward (TARA's inputs are written out), so steps replay independently.
    """
    ans = item.pos if side == "pos" else item.neg
    ctx = item.as_context(side)
    return tuple(replace(s, observation=call_tool(s.action, s.action_input, ctx)) for s in ans.steps)


__all__ = [
    "START_TOOL", "START_OBSERVATION", "START_WORK", "THEMIS_SPECIAL_TOKENS", "NO_TOOL_TRACE", "TOOL_FAILED_OBSERVATION",
    "TARA_FILES", "ToolCall", "TaraAnswer", "TaraItem", "ThemisSegments", "tara_dir", "parse_actions", "parse_item",
    "load_tara", "load_tara_file", "load_weather_cache", "render_user", "render_plain", "render_themis", "render_item",
    "replay_steps", "normalize_actions_text",
]
