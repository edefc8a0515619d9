"""How a policy writes a tool call and how the observation is written back, as token ids (docs/tool_use.md).

Two formats:
- `HermesFormat` (Hermes / Qwen): calls are `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks
  (several per turn allowed) inside an assistant turn, which ends at the end-of-turn token (the tokenizer's
  EOS / a stop token). The observation is the tool-response turn rendered by the tokenizer's own chat
  template (role "tool" messages) plus the next assistant generation prompt.
- `ThemisFormat` (Themis / ReAct text): `Action: name\nAction Input: input\nObservation:`; the row pauses at
  the stop string "Observation:", and " {result}\n" is appended.

Observation ids never carry control tokens a tool printed: the template's own pieces (turn markers) are
tokenised normally, the tool's text with `split_special_tokens=True`, so a program that prints `</tool_call>`
or an end-of-turn token yields ordinary characters, never the special id.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

TRUNCATION_MARKER = "\n[observation truncated: {n} characters]"
CHARS_PER_TOKEN_CAP = 32  # text beyond this many characters per allowed token is cut before tokenising (1 MB)
INVALID_CALL = "invalid_tool_call"

# A Hermes-style tool-calling template for align.testing's character tokenizer (no real one can be
# downloaded): one system line lists the tools, role "tool" messages become one user turn of
# <tool_response> blocks, every turn ends with the EOS token.
TINY_TOOL_CHAT_TEMPLATE = (  # newlines as {{ '\n' }}: whitespace control never eats them
    "{%- if tools %}system: Tools: {% for t in tools %}{{ t | tojson }}{% endfor %}"
    " Call one with <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>.{{ eos_token }}{{ '\\n' }}{% endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}user: {% else %}{{ '\\n' }}{% endif %}"
    "<tool_response>{{ '\\n' }}{{ m['content'] }}{{ '\\n' }}</tool_response>"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ eos_token }}{{ '\\n' }}{% endif %}"
    "{%- else %}{{ m['role'] }}: {{ m['content'] }}"
    "{%- for c in m.get('tool_calls') or [] %}<tool_call>"
    "{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson }}</tool_call>"
    "{%- endfor %}{{ eos_token }}{{ '\\n' }}{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}assistant: {% endif %}"
)


@dataclass
class ParsedCall:
    """One call the policy wrote: name and arguments, or `error` (why it could not be read) and the raw text."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    raw: str = ""
    error: str | None = None

    def message(self) -> dict:
        """The TRL-style tool_calls entry (a malformed call keeps its raw text as arguments {"raw": ...})."""
        args = self.arguments if self.error is None else {"raw": self.raw}
        return {"type": "function", "function": {"name": self.name, "arguments": args}}


def encode_observation(tokenizer, pieces: list[tuple[str, bool]], max_tokens: int) -> tuple[list[int], list[str]]:
    """Token ids of an observation built from (text, is_tool_output) pieces, and each tool output's text as
    appended (after truncation). Template pieces parse special tokens; tool output never does; a tool output
    longer than `max_tokens` tokens is cut there and a marker says how long it was."""
    ids: list[int] = []
    shown: list[str] = []
    for text, hostile in pieces:
        if not text:
            continue
        if not hostile:
            ids += tokenizer(text, add_special_tokens=False).input_ids
            continue
        n_chars = len(text)
        cut = text[:max_tokens * CHARS_PER_TOKEN_CAP]  # never tokenise a 1 MB output whole
        got = tokenizer(cut, add_special_tokens=False, split_special_tokens=True).input_ids
        if len(got) > max_tokens or len(cut) < n_chars:
            got = got[:max_tokens]
            marker = TRUNCATION_MARKER.format(n=n_chars)
            got += tokenizer(marker, add_special_tokens=False, split_special_tokens=True).input_ids
            cut = tokenizer.decode(got, skip_special_tokens=False)
        ids += got
        shown.append(cut)
    return ids, shown


def decode_turn(tokenizer, ids: list[int], markup: tuple[str, ...] = ()) -> str:
    """A policy turn's text: the tokenizer's special tokens dropped (EOS, end-of-turn), except the format's own
    markup. Some tokenizers register `<tool_call>` as a special token; skipping every special token would drop
    the tag and silently turn a call into plain text."""
    unk = tokenizer.unk_token_id
    keep = {i for i in (tokenizer.convert_tokens_to_ids(t) for t in markup) if i is not None and i != unk}
    drop = set(tokenizer.all_special_ids) - keep
    return tokenizer.decode([i for i in ids if i not in drop], skip_special_tokens=False)


def _arguments(value: Any) -> dict | None:
    if isinstance(value, str):  # some models write the arguments as a JSON string
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    return value if isinstance(value, dict) else None


class HermesFormat:
    """`<tool_call>{json}</tool_call>` blocks in an assistant turn; the tool turn from the chat template."""

    name = "hermes"
    stop: list[str] = []  # the turn ends at the end-of-turn token; every block in it is a call
    markup = ("<tool_call>", "</tool_call>")  # kept when a turn is decoded, even where they are special tokens
    _BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def __init__(self, tokenizer, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        if not self.chat_template:
            raise ValueError("tool_format 'hermes' needs a chat template; the tokenizer has none "
                             "(pass chat_template=..., e.g. TINY_TOOL_CHAT_TEMPLATE for the test tokenizer)")

    def wants_call(self, text: str, ended_by_stop: bool) -> bool:
        return "<tool_call>" in text

    def parse(self, text: str) -> list[ParsedCall]:
        calls = []
        for m in self._BLOCK.finditer(text):
            raw = m.group(1).strip()
            if not m.group(0).endswith("</tool_call>"):
                calls.append(ParsedCall(INVALID_CALL, raw=raw, error="the <tool_call> block is not closed"))
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                calls.append(ParsedCall(INVALID_CALL, raw=raw, error=f"the call is not valid JSON ({exc.msg})"))
                continue
            name = obj.get("name") if isinstance(obj, dict) else None
            args = _arguments(obj.get("arguments", {})) if isinstance(obj, dict) else None
            if not isinstance(name, str) or args is None:
                calls.append(ParsedCall(name if isinstance(name, str) else INVALID_CALL, raw=raw,
                                        error='a call needs {"name": string, "arguments": object}'))
                continue
            calls.append(ParsedCall(name, args, raw))
        return calls

    def content(self, text: str) -> str:
        return self._BLOCK.sub("", text).strip()

    def observation(self, outputs: list[tuple[str, str]], last_token_text: str, max_tokens: int):
        """(ids, shown texts) of the tool turn for [(tool name, output)], after a turn whose last token reads
        `last_token_text` (the end-of-turn token the policy emitted is not repeated)."""
        sentinel = "\x00ALIGN_TURN\x00"
        slots = [f"\x00ALIGN_OBS_{k}\x00" for k in range(len(outputs))]
        messages = [{"role": "user", "content": "u"}, {"role": "assistant", "content": sentinel}]
        messages += [{"role": "tool", "name": n, "content": s} for (n, _), s in zip(outputs, slots)]
        text = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=True)
        tail = text[text.index(sentinel) + len(sentinel):]
        if last_token_text and tail.startswith(last_token_text):
            tail = tail[len(last_token_text):]
        pieces: list[tuple[str, bool]] = []
        for k, slot in enumerate(slots):
            before, tail = tail.split(slot, 1)
            pieces += [(before, False), (outputs[k][1], True)]
        pieces.append((tail, False))
        return encode_observation(self.tokenizer, pieces, max_tokens)


class ThemisFormat:
    """`Action: name\\nAction Input: input\\nObservation:` (one call per pause); " result\\n" appended."""

    name = "themis"
    stop = ["Observation:"]
    _NAME = re.compile(r"Action\s*\d*\s*:")

    def __init__(self, tokenizer, chat_template: str | None = None, *, action_re: re.Pattern | None = None):
        # Themis' own Action regex (align.tools.trace.ACTION_RE, one definition) is passed in by the caller:
        # align.rollouts may not import align.tools
        if action_re is None:
            raise ValueError("tool_format 'themis' needs the Themis Action regex (align.tools.trace.ACTION_RE)")
        self.tokenizer = tokenizer
        self.action_re = action_re

    def wants_call(self, text: str, ended_by_stop: bool) -> bool:
        return ended_by_stop and text.rstrip().endswith("Observation:")

    def parse(self, text: str) -> list[ParsedCall]:
        body = text.rstrip()
        body = body[:-len("Observation:")] if body.endswith("Observation:") else body
        starts = [m.start() for m in self._NAME.finditer(body)]  # "Action:" (never "Action Input:")
        m = self.action_re.search(body, starts[-1]) if starts else None
        if m is None:
            return [ParsedCall(INVALID_CALL, raw=text[-200:], error="no 'Action:' / 'Action Input:' before 'Observation:'")]
        name, arg = m.group(1).strip(), m.group(2).strip()
        return [ParsedCall(name, {"input": arg}, m.group(0))]

    def content(self, text: str) -> str:
        return text

    def observation(self, outputs: list[tuple[str, str]], last_token_text: str, max_tokens: int):
        # the space goes with the output: a byte-level BPE writes " Monday" as one token, and the observation
        # must be the ids of the text " {result}\n" as tokenised, not " " and the result tokenised apart
        ids, shown = encode_observation(self.tokenizer, [(" " + outputs[0][1], True), ("\n", False)], max_tokens)
        return ids, [s[1:] if s.startswith(" ") else s for s in shown]  # the text as the tool wrote it


FORMATS = {"hermes": HermesFormat, "themis": ThemisFormat}


def get_format(name: str, tokenizer, chat_template: str | None = None, **options):
    if name not in FORMATS:
        raise ValueError(f"unknown tool_format {name!r}; use one of {sorted(FORMATS)}")
    return FORMATS[name](tokenizer, chat_template, **options)
