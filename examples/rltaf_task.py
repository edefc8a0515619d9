"""The RLTAF task: "What date is N days after YYYY-MM-DD?" with 1 <= N <= 9 and no month wrap.

Two phrasings of the same questions (`FORMS`): "after" (above: runs 1-3) and "later" ("What date is
YYYY-MM-DD, N days later?": run 4), where the first tool call's input `YYYY-MM-DD, N` is a span of the
question, so an RM that copies spans writes it; the policy's task and the plain RM's are the same either way.

A tiny policy can learn it (the answer is the question's date with the day raised by N), a plain reward model
has to do that arithmetic in its head to tell a right answer from a date one to three days off, and a
tool-augmented one (Themis) can call `Calendar.target_day('YYYY-MM-DD, N')` and compare. Everything here is
plain Python (no torch): questions, splits, hard-negative preference pairs in TARA's format (so that
`align train-rm` trains both RMs from the same file), SFT / prompt files, and the oracle reward.

Splits are disjoint by question (date, N): `split_questions` draws one shuffled list of every question in the
years, and gives RL prompts, SFT, RM pairs and the held-out questions consecutive slices of it.
"""
from __future__ import annotations

import calendar
import json
import random
import re
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Sequence

MAX_N = 9
YEARS = tuple(range(2000, 2030))
THOUGHT = "Add the days."
ACTION = "Calendar.target_day"
COMPARE_THOUGHT = "Compare the answer."
COMPARE_ACTION = "Calendar.day_difference"
# Themis' synthetic traces: "compare" (two calls: target_day, then day_difference of the answer and that date;
# '0' exactly when the answer is right), "worked" (one call, then the day digits compared in the rationale:
# run 2), "released" (one call, then the verdict: run 1)
TRACES = ("compare", "worked", "released")
# characters a garbled answer gets (what the SFT policy emits when it slips: '2027-0@07', '2024-01-19z');
# no whitespace or double quote, which the released parser strips from an Action Input's ends
_GARBLE = "0123456789-abcdefghijklmnopqrstuvwxyzKGX@{|(]?'"
RIGHT = "The answer matches the tool's date."
WRONG = "The answer differs from the tool's date."
FORMS = ("after", "later")
_QUESTION_RES = {"after": re.compile(r"What date is (?P<n>\d) days? after (?P<date>\d{4}-\d{2}-\d{2})\?"),
                 "later": re.compile(r"What date is (?P<date>\d{4}-\d{2}-\d{2}), (?P<n>\d) days? later\?")}


@dataclass(frozen=True, order=True)
class Question:
    start: date
    n: int
    form: str = field(default="after", compare=False)  # the phrasing (FORMS); the same question either way

    @property
    def text(self) -> str:
        days = f"{self.n} day{'s' if self.n != 1 else ''}"
        if self.form == "later":
            return f"What date is {self.start.isoformat()}, {days} later?"
        return f"What date is {days} after {self.start.isoformat()}?"

    @property
    def answer(self) -> str:
        return (self.start + timedelta(days=self.n)).isoformat()


def all_questions(years: Sequence[int] = YEARS) -> list[Question]:
    """Every (date, N) with 1 <= N <= 9 whose answer stays in the date's month (no month wrap)."""
    out = []
    for y in years:
        for m in range(1, 13):
            last = calendar.monthrange(y, m)[1]
            for d in range(1, last + 1):
                out.extend(Question(date(y, m, d), n) for n in range(1, MAX_N + 1) if d + n <= last)
    return out


def parse_question(text: str) -> Question | None:
    """A question in either phrasing -> the Question (None if it is neither, or no valid date)."""
    for form, pattern in _QUESTION_RES.items():
        m = pattern.fullmatch(text.strip())
        if m:
            try:
                return Question(date.fromisoformat(m.group("date")), int(m.group("n")), form)
            except ValueError:
                return None
    return None


def hard_negative(q: Question, rng: random.Random) -> str:
    """A wrong answer 1-3 days off the right one, in the same month (so it differs only in the day)."""
    right = q.start + timedelta(days=q.n)
    last = calendar.monthrange(right.year, right.month)[1]
    offsets = [o for o in (-3, -2, -1, 1, 2, 3) if 1 <= right.day + o <= last]
    return (right + timedelta(days=rng.choice(offsets))).isoformat()


def far_negative(q: Question, rng: random.Random) -> str:
    """A wrong date more than 3 days off, the SFT policy's other wrong answers: half of the draws in the same
    month (4 or more days off) where the month has such a day, the rest in another month (20-400 days off)."""
    right = q.start + timedelta(days=q.n)
    last = calendar.monthrange(right.year, right.month)[1]
    same = [d for d in range(1, last + 1) if abs(d - right.day) > 3]
    if same and rng.random() < 0.5:
        return right.replace(day=rng.choice(same)).isoformat()
    while True:
        wrong = right + timedelta(days=rng.choice((-1, 1)) * rng.randint(20, 400))
        if (wrong.year, wrong.month) != (right.year, right.month):
            return wrong.isoformat()


def malformed_negative(q: Question, rng: random.Random) -> str:
    """A string near the right date that is not the right date in the tool's reading either: truncated,
    garbled (a character inserted, replaced or deleted) or an impossible day / month (day 00 or past the
    month's end, month 00 or 13). Strings that `Calendar.day_difference` reads as the right date (e.g.
    '2017-10-7' for 2017-10-07) are redrawn: the tool cannot tell them apart, so they are no negatives for it."""
    right = q.answer
    while True:
        kind = rng.choice(("truncate", "insert", "replace", "delete", "impossible"))
        i = rng.randrange(len(right))
        if kind == "truncate":
            s = right[:-rng.randint(1, 2)]
        elif kind == "insert":
            s = right[:i] + rng.choice(_GARBLE) + right[i:]
        elif kind == "replace":
            s = right[:i] + rng.choice(_GARBLE.replace(right[i], "")) + right[i + 1:]
        elif kind == "delete":
            s = right[:i] + right[i + 1:]
        else:
            y, m, _ = right.split("-")
            last = calendar.monthrange(int(y), int(m))[1]
            s = rng.choice((f"{y}-{m}-00", f"{y}-{m}-{last + 1:02d}", f"{y}-{m}-32", f"{y}-00-{right[8:]}",
                            f"{y}-13-{right[8:]}"))
        if s != right and compare_observation(s, right) != "0":
            return s


def negative(q: Question, rng: random.Random, far: float = 0.0, malformed: float = 0.0) -> str:
    """A hard negative (`hard_negative`), or with probability `far` a date more than 3 days off and with
    probability `malformed` a malformed string. far = malformed = 0 draws exactly `hard_negative`'s sequence."""
    u = rng.random() if far or malformed else 1.0
    if u < malformed:
        return malformed_negative(q, rng)
    if u < malformed + far:
        return far_negative(q, rng)
    return hard_negative(q, rng)


def tool_observation(action: str, tool_input: str) -> str:
    """What Themis' trace loop shows after 'Observation:' for this call (align.rewards.themis_traces
    ThemisToolEnvironment.step): the tool's output, or the failure text with the tool's error."""
    from align.tools import get_tool

    result = get_tool(action)(tool_input, context={})
    return str(result.output) if result.ok else f"Error: the tool {action!r} failed: {result.error}"


def compare_observation(answer: str, right: str) -> str:
    """The second call's observation: `Calendar.day_difference('<answer>, <right date>')`."""
    return tool_observation(COMPARE_ACTION, f"{answer}, {right}")


def compare_steps(q: Question, answer: str) -> list[dict[str, str]]:
    """The two tool calls of a "compare" trace (the tool does the comparison; the model only copies): 1)
    `Calendar.target_day('<question's date>, N')` -> the right date; 2) `Calendar.day_difference('<the
    answer>, <that date>')` -> '0' exactly when the answer is right, a count of days otherwise, a failure
    text when the answer is no date."""
    first_input = f"{q.start.isoformat()}, {q.n}"
    right = tool_observation(ACTION, first_input)
    second_input = f"{answer}, {right}"
    return [{"Thought": THOUGHT, "Action": ACTION, "Action Input": first_input, "Observation": right},
            {"Thought": COMPARE_THOUGHT, "Action": COMPARE_ACTION, "Action Input": second_input,
             "Observation": tool_observation(COMPARE_ACTION, second_input)}]


def actions_text(steps: Sequence[dict[str, str]]) -> str:
    """Several tool steps as TARA's multi-tool records write them (align.tools.trace.parse_tara_actions)."""
    return "\n".join(f"Thought: {s['Thought']}\nAction: {s['Action']}\nAction Input: {s['Action Input']}\n"
                     f"Observation: {s['Observation']}" for s in steps)


def split_questions(seed: int = 0, sizes: dict[str, int] | None = None, rl: int = 2000,
                    form: str = "after") -> dict[str, list[Question]]:
    """Disjoint question sets (consecutive slices of one shuffled list). The split seed is fixed for the task
    (the same held-out set for every experiment seed); `rl` sizes the last slice (the RL prompts) only, so the
    other sets do not depend on it; `form` phrases them (FORMS) without changing which questions they are."""
    if form not in FORMS:
        raise ValueError(f"question form must be one of {', '.join(FORMS)}, got {form!r}")
    sizes = sizes or {"heldout": 600, "rm_test": 400, "rm_train": 3000, "sft": 3000, "rl": rl}
    qs = all_questions()
    random.Random(seed).shuffle(qs)
    out, start = {}, 0
    for name, k in sizes.items():
        out[name] = [replace(q, form=form) for q in qs[start:start + k]]
        start += k
    if start > len(qs):
        raise ValueError(f"asked for {start} questions, the task has {len(qs)}")
    return out


def worked_comparison(answer: str, observation: str) -> str:
    """The rationale's working (`worked=True`): the answer and the tool's date restated (each an exact repeat
    of its line above, so a model that copies writes them), their day digits side by side, and per digit '='
    (same) or 'x' (differs), e.g. "Answer: 2017-10-14. Observation: 2017-10-17. Days 14 17: =x. ". A tiny model
    that copies but cannot compare two dates a hundred tokens apart can then write every character from a
    few tokens just before it, and the verdict from the two marks (hard negatives differ in the day only)."""
    a, o = answer[8:10].ljust(2, "?"), observation[8:10].ljust(2, "?")
    marks = "".join("=" if x == y else "x" for x, y in zip(a, o))
    return f"Answer: {answer}. Observation: {observation}. Days {a} {o}: {marks}. "


def tara_record(q: Question, negative: str, idx: int, worked: bool = False, trace: str | None = None) -> dict[str, Any]:
    """One preference pair in TARA's format: the question, the right and a wrong answer, each with its tool
    trace and a rationale stating the verdict. trace (TRACES; default "worked" if `worked` else "released"):
    "released" one `Calendar.target_day` call; "worked" the same call and the digit comparison of
    `worked_comparison` before the verdict; "compare" the two calls of `compare_steps` (a multi-tool trace, as
    TARA's multi-tool records write it) and the verdict."""
    trace = trace or ("worked" if worked else "released")
    if trace not in TRACES:
        raise ValueError(f"unknown trace {trace!r}; choose from {', '.join(TRACES)}")
    tool_input = f"{q.start.isoformat()}, {q.n}"

    def side(answer: str, score: float, why: str) -> dict[str, Any]:
        actions: Any = {"Thought": THOUGHT, "Action": ACTION, "Action Input": tool_input, "Observation": q.answer}
        if trace == "compare":
            actions = actions_text(compare_steps(q, answer))
        why = (worked_comparison(answer, q.answer) if trace == "worked" else "") + why
        return {"answer": answer, "score": score, "actions": actions, "score_agent": {"explanation": why, "score": str(score)}}

    return {"id": f"rltaf_{idx}", "question": q.text, "pos_answer": side(q.answer, 1.0, RIGHT),
            "neg_answer": side(negative, -1.0, WRONG)}


def write_pairs(path: Path, questions: Sequence[Question], seed: int, worked: bool = False, trace: str | None = None,
                far: float = 0.0, malformed: float = 0.0) -> Path:
    """Preference pairs of `questions` (negatives: `negative` with the `far` / `malformed` shares)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(tara_record(q, negative(q, rng, far, malformed), i, worked, trace)) + "\n"
                            for i, q in enumerate(questions)))
    return path


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_rows(questions: Sequence[Question]) -> list[dict[str, str]]:
    return [{"prompt": q.text, "completion": q.answer} for q in questions]


def prompt_rows(questions: Sequence[Question]) -> list[dict[str, str]]:
    return [{"prompt": q.text, "answer": q.answer} for q in questions]


def is_correct(question: str, completion: str) -> bool:
    q = parse_question(question)
    return q is not None and completion.strip() == q.answer


def exact_date(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
    """The oracle reward (the ceiling arm, and the ground truth logged beside an RM at weight 0), TRL-style:
    1 when the completion is exactly the right date (surrounding whitespace ignored), else 0. Reads the
    question from the prompt, so it needs no extra data column."""
    return [float(is_correct(p, c)) for p, c in zip(prompts, completions)]


def win_tie_lose(a: Sequence[bool], b: Sequence[bool]) -> dict[str, int]:
    """Per question: a right and b wrong = win (for a), both the same = tie, a wrong and b right = lose."""
    if len(a) != len(b):
        raise ValueError("win_tie_lose needs results for the same questions")
    win = sum(x and not y for x, y in zip(a, b))
    lose = sum(y and not x for x, y in zip(a, b))
    return {"win": win, "tie": len(a) - win - lose, "lose": lose}


def write_task_files(out_dir: Path, rm_pairs: int = 2000, rm_test: int = 400, sft_examples: int = 3000) -> dict[str, Path]:
    """Every data file of the recipe (docs/experiments/rltaf.md): RM train / test pairs (TARA format), SFT
    pairs, GRPO prompts (with an `answer` column) and the held-out questions."""
    s = split_questions()
    out_dir = Path(out_dir)
    return {"rm_train": write_pairs(out_dir / "rm_train.jsonl", s["rm_train"][:rm_pairs], seed=1),
            "rm_test": write_pairs(out_dir / "rm_test.jsonl", s["rm_test"][:rm_test], seed=2),
            "sft": write_jsonl(out_dir / "sft.jsonl", sft_rows(s["sft"][:sft_examples])),
            "rl_prompts": write_jsonl(out_dir / "rl_prompts.jsonl", prompt_rows(s["rl"])),
            "heldout": write_jsonl(out_dir / "heldout.jsonl", prompt_rows(s["heldout"]))}


if __name__ == "__main__":
    import sys

    for name, path in write_task_files(Path(sys.argv[1] if len(sys.argv) > 1 else "data/rltaf")).items():
        print(f"{name}: {path}")
