"""The RLTAF task: "What date is N days after YYYY-MM-DD?" with 1 <= N <= 9 and no month wrap.

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
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Sequence

MAX_N = 9
YEARS = tuple(range(2000, 2030))
THOUGHT = "Add the days."
ACTION = "Calendar.target_day"
RIGHT = "The answer matches the tool's date."
WRONG = "The answer differs from the tool's date."
_QUESTION_RE = re.compile(r"What date is (\d) days? after (\d{4}-\d{2}-\d{2})\?")


@dataclass(frozen=True, order=True)
class Question:
    start: date
    n: int

    @property
    def text(self) -> str:
        return f"What date is {self.n} day{'s' if self.n != 1 else ''} after {self.start.isoformat()}?"

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
    m = _QUESTION_RE.fullmatch(text.strip())
    if not m:
        return None
    y, mo, d = map(int, m.group(2).split("-"))
    return Question(date(y, mo, d), int(m.group(1)))


def hard_negative(q: Question, rng: random.Random) -> str:
    """A wrong answer 1-3 days off the right one, in the same month (so it differs only in the day)."""
    right = q.start + timedelta(days=q.n)
    last = calendar.monthrange(right.year, right.month)[1]
    offsets = [o for o in (-3, -2, -1, 1, 2, 3) if 1 <= right.day + o <= last]
    return (right + timedelta(days=rng.choice(offsets))).isoformat()


def split_questions(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, list[Question]]:
    """Disjoint question sets (consecutive slices of one shuffled list). The split seed is fixed for the task
    (the same held-out set for every experiment seed)."""
    sizes = sizes or {"heldout": 600, "rm_test": 400, "rm_train": 3000, "sft": 3000, "rl": 2000}
    qs = all_questions()
    random.Random(seed).shuffle(qs)
    out, start = {}, 0
    for name, k in sizes.items():
        out[name] = qs[start:start + k]
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


def tara_record(q: Question, negative: str, idx: int, worked: bool = False) -> dict[str, Any]:
    """One preference pair in TARA's format: the question, the right and a wrong answer, each with the tool
    trace (`Calendar.target_day` and its observation) and a rationale stating the verdict (after the digit
    comparison of `worked_comparison` when `worked`)."""
    tool_input = f"{q.start.isoformat()}, {q.n}"

    def side(answer: str, score: float, why: str) -> dict[str, Any]:
        actions = {"Thought": THOUGHT, "Action": ACTION, "Action Input": tool_input, "Observation": q.answer}
        why = (worked_comparison(answer, q.answer) if worked else "") + why
        return {"answer": answer, "score": score, "actions": actions, "score_agent": {"explanation": why, "score": str(score)}}

    return {"id": f"rltaf_{idx}", "question": q.text, "pos_answer": side(q.answer, 1.0, RIGHT),
            "neg_answer": side(negative, -1.0, WRONG)}


def write_pairs(path: Path, questions: Sequence[Question], seed: int, worked: bool = False) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(tara_record(q, hard_negative(q, rng), i, worked)) + "\n"
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
