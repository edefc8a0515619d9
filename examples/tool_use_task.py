"""The task of examples/tool_use.py: products of two 3-digit numbers, which a tiny policy cannot compute but can
look up with the calculator tool.

- `build_base`: a tiny random Llama over align.testing's character tokenizer plus a few added (non-special)
  word tokens standing in for a BPE vocabulary's merges (`<tool_call>`, `{"name": `, `"calculator"`, ...), so a
  call is 15 tokens, not 70 characters. Nothing is downloaded.
- `tool_demo` / `direct_demo`: one SFT demonstration as token-id segments, built with the rollout's own pieces
  (the tokenizer, `HermesFormat.observation` over TINY_TOOL_CHAT_TEMPLATE), so the warm start sees exactly the
  ids an episode holds; observation ids carry no loss, as in GRPO.
- `sft`: masked next-token cross-entropy on those segments (align.sft takes flat prompt/completion pairs and
  would put loss on the tool's output).
- `ExactProduct` (the GRPO reward: 1 when the final answer equals a*b), `ValidCall` (logged with weight 0: the
  episode holds a calculator call that parsed and returned a number), and `evaluate` (greedy, held-out).

An example, not part of the library: `import tool_use_task` with examples/ on sys.path.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import torch

from align.rollouts.tool_formats import TINY_TOOL_CHAT_TEMPLATE, HermesFormat
from align.testing import make_char_tokenizer, tiny_config

# added (non-special) tokens: kept by decode(skip_special_tokens=True), so the Hermes parser sees them
WORD_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", '{"name": ', '"calculator"',
               ', "arguments": ', '{"input": "', '"}}']
TOOL = "calculator"
LO, HI = 100, 999


def question(a: int, b: int) -> str:
    return f"{a}*{b}"


def prompt_text(tok, a: int, b: int) -> str:
    return tok.apply_chat_template([{"role": "user", "content": question(a, b)}], tokenize=False,
                                   add_generation_prompt=True)


def split_items(n_train: int, n_eval: int, seed: int = 1234) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Disjoint (a, b) pairs: training prompts (SFT demonstrations and GRPO prompts) and held-out questions."""
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    out: list[tuple[int, int]] = []
    while len(out) < n_train + n_eval:
        ab = (rng.randint(LO, HI), rng.randint(LO, HI))
        if ab not in seen:
            seen.add(ab)
            out.append(ab)
    return out[:n_train], out[n_train:]


def build_tokenizer():
    tok = make_char_tokenizer()
    tok.add_tokens(WORD_TOKENS)
    tok.chat_template = TINY_TOOL_CHAT_TEMPLATE
    return tok


def build_base(path: Path, seed: int, hidden_size: int = 64, num_layers: int = 2) -> Path:
    """A tiny random Llama and its tokenizer saved like a checkpoint (align.train loads it by path)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    tok = build_tokenizer()
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tok), hidden_size, num_layers, 4, 256, **ids))
    model.generation_config = GenerationConfig(**ids)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def call_text(a: int, b: int) -> str:
    call = {"type": "function", "function": {"name": TOOL, "arguments": {"input": question(a, b)}}}
    return f"<tool_call>{json.dumps({'name': call['function']['name'], 'arguments': call['function']['arguments']})}</tool_call>"


def tool_demo(tok, fmt: HermesFormat, a: int, b: int) -> list[tuple[list[int], bool]]:
    """(ids, trained) segments: prompt, the call turn, the observation (as the episode loop appends it), the
    answer turn."""
    eos = tok.eos_token_id
    call = tok(call_text(a, b), add_special_tokens=False).input_ids + [eos]
    obs, _ = fmt.observation([(TOOL, str(a * b))], tok.decode([eos]), 64)
    answer = tok(str(a * b), add_special_tokens=False).input_ids + [eos]
    return [(tok(prompt_text(tok, a, b)).input_ids, False), (call, True), (obs, False),
            (answer, True)]


def direct_demo(tok, a: int, b: int) -> list[tuple[list[int], bool]]:
    return [(tok(prompt_text(tok, a, b)).input_ids, False),
            (tok(str(a * b), add_special_tokens=False).input_ids + [tok.eos_token_id], True)]


def copy_doc(tok, rng: random.Random) -> list[tuple[list[int], bool]]:
    """One pre-training document: `label: s` then `label2: s` (loss on the copy). The base model learns to copy
    a string it has seen, the skill a pretrained LM brings to tool use; no tool call, no product appears."""
    s = "".join(rng.choice("0123456789*+-") for _ in range(rng.randint(3, 9)))
    l1, l2 = rng.sample(COPY_LABELS, 2)
    return [(tok(f"{l1}: {s}\n{l2}: ").input_ids, False), (tok(s, add_special_tokens=False).input_ids + [tok.eos_token_id], True)]


COPY_LABELS = ["x", "in", "copy", "echo", "value", "out", "say", "text", "a", "b", "key"]


def _batch(rows: list[list[tuple[list[int], bool]]], pad: int):
    flat = [(sum((ids for ids, _ in d), []), sum(([t] * len(ids) for ids, t in d), [])) for d in rows]
    T = max(len(ids) for ids, _ in flat)
    input_ids = torch.full((len(flat), T), pad, dtype=torch.long)
    att = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (ids, trained) in enumerate(flat):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        att[i, :len(ids)] = 1
        labels[i, :len(ids)] = torch.where(torch.tensor(trained), torch.tensor(ids), torch.tensor(-100))
    return input_ids, att, labels


def sft(model_dir: Path, out_dir: Path, demos: list[list[tuple[list[int], bool]]], steps: int, batch_size: int,
        lr: float, seed: int, check=None, check_every: int = 4, stop_at: float = 0.5) -> dict[str, Any]:
    """Up to `steps` AdamW steps of `batch_size` demonstrations (cycled in a seeded order), loss on trained
    segments; saves to `out_dir`. With `check(model, tok) -> share`, the share is measured every `check_every`
    steps and SFT stops at the last check below `stop_at` (the weights of that check are the ones saved)."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.algos.schedule import lambda_lr

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = lambda_lr(opt, total=steps, warmup=4)  # (s + 1) / 5 for the first 4 steps, then constant
    rng = random.Random(seed)
    order: list[int] = []
    checks: list[dict[str, float]] = []
    kept = (0, None, float("nan"))  # (step, state, share) of the last check below stop_at
    loss_value, done = float("nan"), 0
    if check is not None:
        kept = (0, copy.deepcopy(model.state_dict()), check(model.eval(), tok))
        checks.append({"step": 0, "share": kept[2]})
    for step in range(1, steps + 1):
        model.train()
        if len(order) < batch_size:
            more = list(range(len(demos)))
            rng.shuffle(more)
            order += more
        batch, order = [demos[i] for i in order[:batch_size]], order[batch_size:]
        input_ids, att, labels = _batch(batch, tok.pad_token_id)
        loss = model(input_ids=input_ids, attention_mask=att, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value, done = float(loss.detach()), step
        if check is not None and step % check_every == 0:
            share = check(model.eval(), tok)
            checks.append({"step": step, "share": share, "loss": loss_value})
            if share >= stop_at:
                break
            kept = (step, copy.deepcopy(model.state_dict()), share)
    if check is not None:
        done = kept[0]
        model.load_state_dict(kept[1])
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return {"loss": loss_value, "steps": done, "examples": done * batch_size, "checks": checks,
            "share_at_stop": kept[2]}


# --------------------------------------------------------------------------------------------- rewards

_INT = re.compile(r"\s*(-?\d+)\s*$")


def final_answer(completion: str, trajectory: list[dict] | None) -> str:
    """The text the policy gave as its answer: the last assistant turn (after any tool turns) of a tool
    episode, else the completion."""
    if trajectory:
        last = trajectory[-1]
        return last.get("content", "") if last.get("role") == "assistant" and not last.get("tool_calls") else ""
    return completion


def is_correct(text: str, gold: Any) -> bool:
    m = _INT.fullmatch(text)
    return bool(m) and m.group(1) == str(gold)


def valid_call(trajectory: list[dict] | None) -> bool:
    """The episode holds a calculator call that parsed and whose observation is a number (the tool ran)."""
    for msg in trajectory or []:
        if msg.get("role") == "tool" and msg.get("name") == TOOL and _INT.fullmatch(msg.get("content", "")):
            return True
    return False


def right_expression(trajectory: list[dict] | None, a: int, b: int) -> bool:
    """The episode's calculator calls include one with exactly the question's expression."""
    return any(c["function"]["name"] == TOOL and c["function"]["arguments"].get("input") == question(a, b)
               for msg in trajectory or [] for c in msg.get("tool_calls") or [])


class ExactProduct:
    """1.0 when the final answer is exactly a*b (the `answer` column), else 0.0."""

    __name__ = "exact_product"

    def __call__(self, prompts, completions, answer, **kwargs):
        traj = kwargs.get("trajectory") or [None] * len(completions)
        return [float(is_correct(final_answer(c, t), g)) for c, t, g in zip(completions, traj, answer)]


class ValidCall:
    """Logged, not optimised (weight 0): 1.0 when the episode made a valid calculator call."""

    __name__ = "valid_call"

    def __call__(self, prompts, completions, **kwargs):
        traj = kwargs.get("trajectory") or [None] * len(completions)
        return [float(valid_call(t)) for t in traj]


def write_prompts(path: Path, tok, items: list[tuple[int, int]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": prompt_text(tok, a, b), "answer": str(a * b)}) + "\n"
                            for a, b in items))
    return path


# ------------------------------------------------------------------------------------------ evaluation

EVAL_LIMITS = dict(max_turns=3, max_tool_calls=2, max_observation_tokens=48)  # as the GRPO config's


@torch.no_grad()
def rollout_eval(model, tok, items: list[tuple[int, int]], tools: bool, temperature: float = 0.0,
                 max_new_tokens: int = 128, seed: int = 0) -> dict[str, Any]:
    """Accuracy, valid-call and right-expression shares of `model` on `items` (greedy by default): with tools
    through the episode loop and the real calculator, without through one engine.generate."""
    from align.rollouts.engine import RolloutEngine
    from align.rollouts.episodes import EpisodeLimits, generate_episodes
    from align.rollouts.params import SamplingParams
    from align.tool_env import ToolEnvironment

    engine = RolloutEngine(model, tok, micro_batch_size=256)
    prompts = [prompt_text(tok, a, b) for a, b in items]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    if tools:
        batch = generate_episodes(engine, prompts, params, HermesFormat(tok, TINY_TOOL_CHAT_TEMPLATE),
                                  ToolEnvironment([TOOL]), EpisodeLimits(**EVAL_LIMITS))
        traj = batch.columns["trajectory"]
    else:
        batch = engine.generate(prompts, params)
        traj = [None] * len(prompts)
    answers = [final_answer(c, t) for c, t in zip(batch.completions, traj)]
    correct = [is_correct(x, a * b) for x, (a, b) in zip(answers, items)]
    right = [right_expression(t, a, b) for t, (a, b) in zip(traj, items)]
    n = len(items)
    return {"accuracy": sum(correct) / n, "valid_call": sum(map(valid_call, traj)) / n, "right_call": sum(right) / n,
            "examples": [{"question": question(a, b), "completion": c} for (a, b), c in
                         list(zip(items, batch.completions))[:3]],
            "trajectories": traj, "batch": batch}


def evaluate(model_dir: Path, items: list[tuple[int, int]], tools: bool, **kw) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return rollout_eval(model, AutoTokenizer.from_pretrained(model_dir), items, tools, **kw)
