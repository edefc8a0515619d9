"""`Answer.mentions('X')`: does the answer under judgement state X? A verification tool for reward models.

A Themis trace fetches a fact with a tool (`Calendar.week_day('2015-03-24')` -> `Tuesday`) and must then
decide whether the judged answer agrees with it. A large RM compares in its rationale; a small one compares
unreliably (docs/experiments/themis_tara.md) but copies a span well, so this tool gives the comparison to code,
as `Calendar.day_difference('<answer>, <tool date>')` does for dates in the RLTAF experiment: the RM copies
the observation into the call and reads back `yes` or `no`.

The answer is the sample's own (`context["answer"]`; Themis passes the judged answer in every tool's
context). The input is matched literally (no pattern syntax), case-insensitively, as a whole: it may not
start or end inside a word or a number of the answer, where a date, a decimal or a time counts as one number
(`-`, `.`, `/` or `:` between digits joins them). So `93` is not found in `931`, `10` not in `2000-01-10`,
`6.0` not in `16.0` and `Monday` not in `Mondays`, while `931` is found in `... is 931.`. Input and answer are
policy-influenced text and are only searched, never run.
"""
from __future__ import annotations

import re

from align.tools.base import Tool, ToolError

MAX_INPUT_CHARS = 200


def mentions(needle: str, answer: str) -> bool:
    """Whether `needle` (stripped of spaces and quotes) occurs in `answer` case-insensitively as a whole word
    or number (see the module docstring)."""
    text = needle.strip().strip("'\"").strip()
    if not text:
        raise ToolError("Answer.mentions needs the text to look for, e.g. Answer.mentions('Tuesday')")
    if len(text) > MAX_INPUT_CHARS:
        raise ToolError(f"Answer.mentions input is {len(text)} characters; at most {MAX_INPUT_CHARS}")
    # not right after a letter / digit, nor after a joiner that follows a digit; likewise on the right
    pattern = r"(?<![0-9A-Za-z])(?<![0-9][-./:])" + re.escape(text) + r"(?![0-9A-Za-z])(?![-./:][0-9])"
    return re.search(pattern, answer, flags=re.IGNORECASE) is not None


class AnswerMentions(Tool):
    name = "Answer.mentions"
    description = "'yes' if the answer being judged states the given text (a value, a date, a word), else 'no'."

    def run(self, input: str, context: dict) -> str:
        answer = context.get("answer")
        if not isinstance(answer, str):
            raise ToolError("Answer.mentions reads the judged answer from its context['answer']; none was given "
                            "(Themis passes it; when calling the tool directly pass context={'answer': ...})")
        return "yes" if mentions(input, answer) else "no"


__all__ = ["AnswerMentions", "mentions", "MAX_INPUT_CHARS"]
