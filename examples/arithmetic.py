"""The toy arithmetic task used by the demo, the examples and the tests: "a+b=" -> the sum.

`write_arithmetic_data(dir)` writes prompts.jsonl (prompt + answer columns, for RL) and sft.jsonl
(prompt + completion, for the supervised warm start) from a seeded generator. `ExactAnswer` is the reward:
1.0 when the completion's first number equals the answer, else 0.0.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

PROMPT = "{a}+{b}="


def arithmetic_items(n: int, seed: int = 0, max_operand: int = 9) -> list[dict]:
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        items.append({"prompt": PROMPT.format(a=a, b=b), "answer": str(a + b)})
    return items


def write_arithmetic_data(out_dir: str | Path, n_rl: int = 256, n_sft: int = 512, seed: int = 0,
                          max_operand: int = 9) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rl = arithmetic_items(n_rl, seed, max_operand)
    sft = arithmetic_items(n_sft, seed + 1, max_operand)
    paths = {"prompts": out / "prompts.jsonl", "sft": out / "sft.jsonl"}
    paths["prompts"].write_text("".join(json.dumps(r) + "\n" for r in rl))
    paths["sft"].write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["answer"]}) + "\n" for r in sft))
    return paths


class ExactAnswer:
    """TRL-style reward: 1.0 if the completion starts with the right number, else 0.0."""

    __name__ = "exact_answer"

    def __call__(self, prompts, completions, answer, **columns):
        out = []
        for completion, gold in zip(completions, answer):
            m = re.match(r"\s*(-?\d+)", completion)
            out.append(1.0 if m and m.group(1) == str(gold) else 0.0)
        return out


exact_answer = ExactAnswer()
