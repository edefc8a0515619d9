"""The scripted Themis LM and hand-written expectations for tests/rewards/test_themis_traces.py.

`Scripted` is a forward hook on ThemisModel.lm: for the row whose prompt is p, the logits are -inf except the
next id of p's script, a list of pieces the model writes (lists of ids) and pieces the loop appends (a tuple:
those exact ids; ANY: whatever the tool returned, up to the next written piece; a written piece's final EOS
may be missing, where the loop drops it to force the rationale). `greedy_reference` is the brute-force trace
loop the engine-driven one is checked against.
"""
from __future__ import annotations

import threading

import torch

from align.rewards.themis import ThemisModel
from align.tools import ToolResult
from align.tools.trace import ACTION_RE

ANY = object()


def user(q: str, a: str, c: str | None = None) -> str:
    ctx = f"Context: {c}\n" if c is not None else ""
    return f"### USER:\n{ctx}Question: {q}\nAnswer: {a}\n### ASSISTANT:\n"


class Scripted:
    """Forward hook on ThemisModel.lm (see the module docstring). Counts forwards; records off-script inputs."""

    def __init__(self, tok):
        self.tok, self.scripts, self.rows, self.forwards, self.off = tok, {}, [], 0, []
        self.eos = tok.eos_token_id

    def set(self, scripts: dict[str, list]):
        self.scripts = {tuple(self.tok(p).input_ids): pieces for p, pieces in scripts.items()}

    def next_token(self, ids: list[int], record: bool) -> int:
        for prompt, pieces in self.scripts.items():
            if tuple(ids[:len(prompt)]) == prompt:
                break
        else:
            raise AssertionError(f"no script for {self.tok.decode(ids)!r}")
        rest, pos = ids[len(prompt):], 0
        for k, piece in enumerate(pieces):
            if isinstance(piece, list):  # written by the model
                m = 0
                while m < len(piece) and pos + m < len(rest) and rest[pos + m] == piece[m]:
                    m += 1
                if pos + m == len(rest):
                    return piece[m] if m < len(piece) else self.eos  # after a stop string: anything, it is cut
                if m < len(piece) - (piece[-1] == self.eos):  # a written EOS the loop dropped may be missing
                    break
                pos += m
            elif isinstance(piece, tuple):  # appended by the loop, exactly these ids
                if rest[pos:pos + len(piece)] != list(piece):
                    break
                pos += len(piece)
            else:  # appended, any ids up to the next written piece (which starts with a special token)
                nxt = pieces[k + 1][0]
                pos = next((j for j in range(pos, len(rest)) if rest[j] == nxt), len(rest))
            if pos == len(rest):
                return pieces[k + 1][0] if k + 1 < len(pieces) else self.eos
        else:
            return self.eos
        if record:
            self.off.append(self.tok.decode(rest, skip_special_tokens=False))
        return self.eos

    def __call__(self, module, args, kwargs, output):
        self.forwards += 1
        ids = kwargs["input_ids"]
        if ids.shape[1] > 1:  # a prefill of (left-padded) rows, or a full forward of one sequence
            pad = self.tok.pad_token_id
            self.rows = [r[(r != pad).nonzero()[0, 0]:].tolist() for r in ids]
            nxt = [self.next_token(r, True) for r in self.rows]
        else:
            for r, t in zip(self.rows, ids[:, 0].tolist()):
                r.append(t)
            nxt = [self.next_token(r, False) for r in self.rows]
        logits = torch.full_like(output.logits[:, -1], -1e9)
        logits[torch.arange(len(nxt)), torch.tensor(nxt)] = 0.0
        output.logits[:, -1] = logits
        return output


def ids(tok, text: str, split: bool = False) -> list[int]:
    return tok(text, add_special_tokens=False, split_special_tokens=split).input_ids


def obs_ids(tok, output: str) -> list[int]:
    """What the loop must append after <start_observation> (written out: ' Observation:', then ' ' + the output
    with special tokens split, then '\\n')."""
    return ids(tok, " Observation:") + ids(tok, " " + output, split=True) + ids(tok, "\n")


def call_turn(tok, action: str, arg: str | None, thought: str = "check it") -> list[int]:
    line = f"\nAction Input: {arg}" if arg is not None else ""
    return ids(tok, f"<start_tool> Thought: {thought}\nAction: {action}{line}\n<start_observation>")


def work(tok, text: str) -> list[int]:
    return ids(tok, f"<start_work> Work: {text}") + [tok.eos_token_id]


def reference_score(model: ThemisModel, seq: list[int]) -> float:
    """One unpadded forward of exactly `seq` (ending with EOS); v_head . h_last in float64."""
    with torch.no_grad():
        h = model.lm.base_model(input_ids=torch.tensor([seq])).last_hidden_state[0, -1].double()
        return float(h @ model.v_head.weight[0].double())


class Recording:
    def __init__(self, fn):
        self.fn, self.calls, self.lock = fn, [], threading.Lock()

    def __call__(self, tool_input, context=None):
        with self.lock:
            self.calls.append((tool_input, dict(context or {})))
        return self.fn(tool_input)


def ok(text):
    return ToolResult(True, text, None, 0.0)


def greedy_reference(model: ThemisModel, tok, prompt: str, call_tool, max_steps: int = 400) -> list[int]:
    """The whole sequence (prompt ids first) by brute force: argmax over the LM's logits of the whole sequence,
    one token at a time (no cache, no padding); at <start_observation> the turn's Action / Action Input are read
    with the Themis regex and `call_tool(action, input)`'s text is appended as ids; an EOS without a rationale
    is replaced by '\\n<start_work>'."""
    eos, work_id, obs_id = tok.eos_token_id, *tok.convert_tokens_to_ids(["<start_work>", "<start_observation>"])
    seq = tok(prompt).input_ids
    start, turn = len(seq), []
    with torch.no_grad():
        for _ in range(max_steps):
            nxt = int(model.lm(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            seq.append(nxt)
            turn.append(nxt)
            if nxt == eos:
                if work_id in seq[start:]:
                    return seq
                body = seq[:-1]
                seq = body + ids(tok, "" if tok.decode(body[start:]).endswith("\n") else "\n") + [work_id]
                turn = []
            elif nxt == obs_id:
                text = tok.decode(turn, skip_special_tokens=True)
                m = ACTION_RE.search(text[text.rfind("Action:"):])
                seq += obs_ids(tok, call_tool(m.group(1).strip(), m.group(2).strip()))
                turn = []
    raise AssertionError(f"no EOS in {max_steps} steps")
