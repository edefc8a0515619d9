"""Preference pairs for reward-model training and evaluation: loading them from TARA groups, JSON Lines files
and Hugging Face datasets (`load_sources`), and rendering one side as a classifier RM's text, with the tool
observations TARA gives or live ones from a `ToolObserver`. Re-exported by `align.rewards.training`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from align.errors import MissingFileError
from align.rewards.preference_format import preference_texts
from align.rewards.tara import (
    TOOL_FAILED_OBSERVATION,
    TaraItem,
    load_tara,
    load_tara_file,
    parse_item,
    render_plain,
)


@dataclass
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    group: str = "all"
    context: str | None = None
    item: TaraItem | None = None      # TARA pairs keep their item (traces, rationales, test_list)


def _pair_from_record(rec: dict[str, Any], default_group: str) -> PreferencePair:
    if "pos_answer" in rec:
        item = parse_item(rec, rec.get("group", default_group))
        return PreferencePair(item.question, item.pos.answer, item.neg.answer, item.group, item.context, item)
    prompt, chosen, rejected = preference_texts(rec)  # TRL's explicit or implicit prompt, text or messages
    return PreferencePair(prompt, chosen, rejected, str(rec.get("group", rec.get("tool", default_group))),
                          rec.get("context"))


def load_pairs(source: str, split: str, limit: int | None = None) -> list[PreferencePair]:
    """One data source (see the module docstring) -> preference pairs."""
    if source.startswith("tara:"):
        spec = source[len("tara:"):]
        groups, _, sp = spec.partition(":")
        items = load_tara([g.strip() for g in groups.split(",") if g.strip()], sp or split, limit)
        return [PreferencePair(it.question, it.pos.answer, it.neg.answer, it.group, it.context, it) for it in items]
    if source.startswith("hf:"):
        import datasets

        name, _, sp = source[len("hf:"):].partition(":")
        ds = datasets.load_dataset(name, split=sp or "train")
        rows = ds.select(range(min(limit, len(ds)))) if limit else ds
        return [_pair_from_record(dict(r), name) for r in rows]
    path = Path(source)
    if not path.is_file():
        raise MissingFileError(f"data source {source!r} not found; give a JSONL file, 'tara:GROUP' or 'hf:NAME'")
    first = path.open().readline()
    if first.strip() and "pos_answer" in first:
        items = load_tara_file(path, limit=limit)
        return [PreferencePair(it.question, it.pos.answer, it.neg.answer, it.group, it.context, it) for it in items]
    pairs = []
    with path.open() as fh:
        for line in fh:
            if line.strip():
                pairs.append(_pair_from_record(json.loads(line), path.stem))
                if limit is not None and len(pairs) >= limit:
                    break
    return pairs


def load_sources(sources: Sequence[str], split: str, limit: int | None = None) -> list[PreferencePair]:
    pairs: list[PreferencePair] = []
    for s in sources:
        pairs.extend(load_pairs(s, split, limit))
    return pairs


class ToolObserver:
    """Runs a TARA step's tool through the `tools` package (cached by action and input).

    A tool that reports failure gives the paper's failure observation; a tool that raises is a crash and
    propagates (never a silent observation).
    """

    def __init__(self, getter: Callable[[str], Callable] | None = None):
        self._getter = getter
        self.cache: dict[tuple[str, str], str] = {}
        self.failures = 0

    def _get(self, name: str):
        if self._getter is not None:
            return self._getter(name)
        from align import tools

        return tools.get_tool(name)

    def __call__(self, action: str, tool_input: str, context: dict[str, Any]) -> str:
        key = (action, tool_input)
        if key not in self.cache or action == "code_run":  # code_run depends on the answer in the context
            result = self._get(action)(tool_input, context=context)
            if not result.ok:
                self.failures += 1
            self.cache[key] = str(result.output) if result.ok else TOOL_FAILED_OBSERVATION
        return self.cache[key]


def classifier_text(pair: PreferencePair, side: str, template: str, observations: str, observer: ToolObserver | None) -> str:
    """The text a classifier RM reads for one side of a pair.

    TARA pairs: "[Context: c\\n]Question: q\\nAnswer: a" (the released plain RM input), followed, when
    observations != none, by the tool steps "Action: ..\\nAction Input: ..\\nObservation: .." with
    observations from the tools (or the gold ones). Other pairs: template.format(prompt, completion).
    """
    completion = pair.chosen if side == "pos" else pair.rejected
    if pair.item is None:
        return template.format(prompt=pair.prompt, completion=completion)
    text = render_plain(pair.prompt, completion, pair.context)
    if observations == "none":
        return text
    ans = pair.item.pos if side == "pos" else pair.item.neg
    ctx = pair.item.as_context(side)
    for step in ans.steps:
        obs = step.observation if observations == "gold" else observer(step.action, step.action_input, ctx)
        text += f"\nAction: {step.action}\nAction Input: {step.action_input}\nObservation: {obs}"
    return text


# ----- training --------------------------------------------------------------------------------------------
