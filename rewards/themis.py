"""Themis: a tool-augmented reward model (Li, Chai, Wang et al., ICLR 2024; PAPERS.md section 1).

Before scoring an answer the model writes a trace: it calls tools (`<start_tool> Thought/Action/Action Input`),
reads their observations (`<start_observation> Observation: ...`), writes a rationale (`<start_work> Work: ...`)
and ends with EOS; `v_head = Linear(hidden, 1, bias=False)` on the final EOS hidden state is the score.

Pieces: `ThemisModel` (causal LM + value head), `encode_themis` (token ids + per-token loss weights with the
released code's masking), `themis_loss` (lm_coef * token-mean CE + rm_coef * Bradley-Terry), and
`ThemisRewardModel`, a RewardFunction running the greedy trace loop batched across samples, with the tool
calls of one round run concurrently through the `tools` package.
"""
from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from align.algos.positions import position_ids_from_mask
from align.errors import MissingFileError
from align.rewards.base import RewardFunction, RewardOutput
from align.rewards.classifier import last_token_index
from align.rewards.tara import ThemisSegments, render_user
from align.tools.trace import (
    ACTION_RE,
    START_OBSERVATION,
    START_TOOL,
    START_WORK,
    THEMIS_SPECIAL_TOKENS,
    TOOL_FAILED_OBSERVATION,
)
from align.tools.trace import parse_action_block as parse_action  # the released parser, under its Themis name

VALUE_HEAD_FILE = "v_head.safetensors"
THEMIS_META_FILE = "themis.json"
ASSISTANT_HEADER = "### ASSISTANT:\n"
FINISHED = "Finished"


# ----- model ---------------------------------------------------------------------------------------------

class ThemisModel(nn.Module):
    """A causal LM plus v_head = Linear(hidden, 1, bias=False) read at the last attended token (the EOS)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        hidden = lm.config.get_text_config().hidden_size
        self.v_head = nn.Linear(hidden, 1, bias=False)
        nn.init.normal_(self.v_head.weight, std=1.0 / (hidden + 1) ** 0.5)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_logits: bool = True):
        """input_ids, attention_mask: [B, T] (left padding) -> (logits [B, T, V] or None, rewards [B])."""
        position_ids = position_ids_from_mask(attention_mask)
        out = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        hidden = out.last_hidden_state  # [B, T, H], after the final norm
        last = last_token_index(attention_mask)
        rewards = self.v_head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last]).squeeze(-1)
        logits = self.lm.get_output_embeddings()(hidden) if with_logits else None
        return logits, rewards


def add_themis_tokens(tokenizer, lm: nn.Module | None = None) -> list[int]:
    """Add the three special tokens (new embedding rows, mean-initialised) -> their ids."""
    missing = [t for t in THEMIS_SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": list(THEMIS_SPECIAL_TOKENS)}, replace_extra_special_tokens=False) \
            if _accepts_replace_kw(tokenizer) else tokenizer.add_special_tokens({"additional_special_tokens": list(THEMIS_SPECIAL_TOKENS)})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    if lm is not None and lm.get_input_embeddings().weight.shape[0] < len(tokenizer):
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return [tokenizer.convert_tokens_to_ids(t) for t in THEMIS_SPECIAL_TOKENS]


def _accepts_replace_kw(tokenizer) -> bool:
    import inspect

    return "replace_extra_special_tokens" in inspect.signature(tokenizer.add_special_tokens).parameters


# ----- training encoding and loss --------------------------------------------------------------------------

@dataclass(frozen=True)
class ThemisLossOptions:
    """Masking / weighting options. Defaults are the released code's behaviour.

    positive_answer_lm: positives also supervise the "Answer: ..." line (released `--lm`); negatives never do.
    beta:  weight of observation tokens in the LM loss; 0 masks the observation text but keeps the
           <start_observation> token (released `--no_observation`).
    omega: weight of the rationale; 0 removes the rationale from the sequence (released `--no_work`).
    observation_dropout: probability that one observation's tokens are left out of the LM loss
           (the paper's 1% observation dropout, applied to supervision).
    """

    positive_answer_lm: bool = True
    beta: float = 1.0
    omega: float = 1.0
    observation_dropout: float = 0.0


def encode_themis(tokenizer, seg: ThemisSegments, positive: bool, opts: ThemisLossOptions = ThemisLossOptions(),
                  rng: random.Random | None = None, max_length: int | None = None) -> tuple[list[int], list[float]]:
    """A rendered sequence -> (input_ids + [EOS], per-token LM weights), both of length T.

    Weight w_t applies to predicting token t from tokens < t (the shift happens in `themis_loss`).
    The supervised region starts at the "### ASSISTANT:" line (negatives) or the "Answer:" line (positives
    with positive_answer_lm); observation text gets beta, the rationale omega, everything else 1; EOS 1.
    """
    enc = tokenizer(seg.text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    start = seg.question_end if (positive and opts.positive_answer_lm) else seg.user_end
    # An observation's region runs from after its <start_observation> token to the next <start_tool> or
    # <start_work> (released: labels[obs+1 : next tool or work index]); without either, through the EOS.
    end_of_all = len(seg.text) + 1
    obs_regions = []
    for s, e in seg.observation_spans:
        nxt = seg.text.find(START_TOOL, e)
        if nxt == -1:
            nxt = seg.work_span[0] if seg.work_span else end_of_all
        dropped = opts.observation_dropout > 0 and (rng or random).random() < opts.observation_dropout
        obs_regions.append((s, nxt, 0.0 if dropped else opts.beta))
    weights = []
    for a, _ in offsets:
        w = 0.0 if a < start else 1.0
        if w:
            for s, e, wo in obs_regions:
                if s <= a < e:
                    w = wo
            if seg.work_span and seg.work_span[0] <= a < seg.work_span[1] and not seg.text.startswith(START_WORK, a):
                w = opts.omega
        weights.append(w)
    ids.append(tokenizer.eos_token_id)
    eos_w = 1.0  # the EOS is masked only where an observation region runs to the end (beta=0, no rationale)
    for s, e, wo in obs_regions:
        if e == end_of_all:
            eos_w = wo
    weights.append(eos_w)
    if max_length is not None and len(ids) > max_length:
        # keep the end (the EOS carries the score); drop from the left
        ids, weights = ids[-max_length:], weights[-max_length:]
    return ids, weights


def pad_left(rows: Sequence[Sequence[float]], pad_value: float, dtype=torch.long) -> torch.Tensor:
    """Rows of different lengths -> [B, T] left-padded tensor."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_value, dtype=dtype)
    for i, r in enumerate(rows):
        if len(r):
            out[i, width - len(r):] = torch.tensor(list(r), dtype=dtype)
    return out


def themis_loss(logits: torch.Tensor, input_ids: torch.Tensor, weights: torch.Tensor, rewards: torch.Tensor,
                lm_coef: float = 1.0, rm_coef: float = 0.5) -> tuple[torch.Tensor, dict[str, float]]:
    """Released Themis loss: lm_coef * token-mean CE + rm_coef * mean(-log sigmoid(r_pos - r_neg)).

    logits [2B, T, V], input_ids [2B, T], weights [2B, T] (0 = not supervised), rewards [2B] with the B
    positives first. Token t is predicted from position t-1. (Released main.py / reward_model.py; the
    paper's form is lm_coef = alpha, rm_coef = 1.)
    """
    shift_logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    w = weights[:, 1:].to(shift_logits.dtype)
    ce = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), targets.reshape(-1), reduction="none").view_as(w)
    lm = (ce * w).sum() / w.sum().clamp(min=1e-8)
    b = rewards.shape[0] // 2
    rm = -F.logsigmoid(rewards[:b].float() - rewards[b:].float()).mean()
    loss = lm_coef * lm + rm_coef * rm
    acc = (rewards[:b] > rewards[b:]).float().mean()
    return loss, {"lm_loss": float(lm.detach()), "rm_loss": float(rm.detach()), "pair_acc": float(acc)}


# ----- the trace loop ---------------------------------------------------------------------------------------

class HFGreedyGenerator:
    """Greedy continuation of a batch of texts, stopping at EOS or <start_observation> (kept in the output)."""

    def __init__(self, lm: nn.Module, tokenizer, max_new_tokens: int = 128, max_length: int = 1024):
        self.lm, self.tokenizer, self.max_new_tokens, self.max_length = lm, tokenizer, max_new_tokens, max_length

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> list[str]:
        tok = self.tokenizer
        stop_ids = [tok.eos_token_id, tok.convert_tokens_to_ids(START_OBSERVATION)]
        side, tside = tok.padding_side, tok.truncation_side
        tok.padding_side, tok.truncation_side = "left", "left"
        try:
            enc = tok(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
        finally:
            tok.padding_side, tok.truncation_side = side, tside
        device = next(self.lm.parameters()).device
        out = self.lm.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                               max_new_tokens=self.max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                               pad_token_id=tok.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        results = []
        for row in new:
            cut = next((i for i, t in enumerate(row) if t in stop_ids), None)
            row = row if cut is None else row[:cut + 1]
            results.append(tok.decode(row, skip_special_tokens=False))
        return results


def _resolve_tool_getter(tools: Mapping[str, Callable] | Callable[[str], Callable] | None) -> Callable[[str], Callable]:
    if tools is None:
        def getter(name: str):
            from align import tools as tools_pkg  # the tools package (imported lazily: rewards -> tools)

            return tools_pkg.get_tool(name)
        return getter
    if isinstance(tools, Mapping):
        def from_map(name: str):
            if name not in tools:
                raise KeyError(name)
            return tools[name]
        return from_map
    return tools


@dataclass
class _TraceState:
    text: str                # the whole sequence so far (USER part + assistant trace)
    context: dict[str, Any]
    rounds: int = 0          # tool calls made
    forced_work: bool = False
    done: bool = False
    tool_calls: list = None  # type: ignore[assignment]

    def __post_init__(self):
        self.tool_calls = []


class ThemisRewardModel(RewardFunction):
    """Tool-augmented RM. For each (prompt, completion): question = prompt, answer = completion (context from
    a `context` column if given); greedy trace with tools (max_rounds) -> rationale -> EOS -> v_head score.

    tools: None (the `tools` package's registry), a {name: tool} mapping, or a callable name -> tool; a tool is
    `tool(input, context=sample) -> ToolResult(ok, output, error, latency_s)`.
    generator: replaces greedy HF generation (texts -> continuations ending at a stop token); for tests.
    """

    name = "themis"

    def __init__(self, model_path: str | None = None, *, model: ThemisModel | None = None, tokenizer: Any = None,
                 tools: Any = None, generator: Callable[[Sequence[str]], list[str]] | None = None,
                 max_rounds: int = 3, max_new_tokens: int = 128, max_length: int = 1024, batch_size: int = 8,
                 max_workers: int = 8, device: str | None = None):
        if max_rounds < 0 or max_new_tokens < 1 or batch_size < 1:
            raise ValueError("max_rounds must be >= 0, max_new_tokens and batch_size >= 1")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if model is None:
            if model_path is None:
                raise ValueError("ThemisRewardModel needs model_path or model= and tokenizer=")
            model, tokenizer = load_themis(model_path)
        elif tokenizer is None:
            raise ValueError("pass tokenizer= together with model=")
        self.model, self.tokenizer = model.to(self.device).eval(), tokenizer
        self.max_rounds, self.max_length, self.batch_size, self.max_workers = max_rounds, max_length, batch_size, max_workers
        self.generator = generator or HFGreedyGenerator(self.model.lm, tokenizer, max_new_tokens, max_length)
        self._tools_spec = tools

    # ----- scoring of finished sequences --------------------------------------------------------------

    @torch.no_grad()
    def score_texts(self, texts: Sequence[str]) -> list[float]:
        """Full sequences (without EOS) -> v_head score at the appended EOS, batched with left padding."""
        scores: list[float] = []
        tok = self.tokenizer
        for i in range(0, len(texts), self.batch_size):
            rows = []
            for t in texts[i:i + self.batch_size]:
                ids = tok(t, add_special_tokens=True)["input_ids"] + [tok.eos_token_id]
                rows.append(ids[-self.max_length:])
            ids = pad_left(rows, tok.pad_token_id).to(self.device)
            mask = pad_left([[1] * len(r) for r in rows], 0).to(self.device)
            _, rewards = self.model(ids, mask, with_logits=False)
            scores.extend(rewards.float().cpu().tolist())
        return scores

    # ----- the loop ---------------------------------------------------------------------------------

    def _call_tool(self, getter, action: str, tool_input: str, context: dict[str, Any]) -> dict[str, Any]:
        record = {"action": action, "input": tool_input, "ok": False, "output": "", "error": None, "latency_s": 0.0}
        try:
            tool = getter(action)
        except KeyError as err:  # includes the registry's UnknownNameError: the RM named a tool that does not exist
            record["error"] = f"unknown tool: {err}"
            return record
        result = tool(tool_input, context=context)  # tools never raise for bad input; an exception is a crash
        record.update(ok=bool(result.ok), output=str(result.output or ""), error=result.error,
                      latency_s=float(getattr(result, "latency_s", 0.0) or 0.0))
        return record

    def run_traces(self, questions: Sequence[str], answers: Sequence[str], contexts: Sequence[str | None],
                   samples: Sequence[dict[str, Any]]) -> list[_TraceState]:
        """Generate the traces for N samples (batched generation; concurrent tool calls per round)."""
        getter = _resolve_tool_getter(self._tools_spec)
        states = [_TraceState(render_user(q, a, c) + ASSISTANT_HEADER, s) for q, a, c, s in zip(questions, answers, contexts, samples)]
        for _ in range(self.max_rounds + 3):  # every round ends a sample, calls a tool, or forces the rationale
            active = [s for s in states if not s.done]
            if not active:
                break
            conts: list[str] = []
            for i in range(0, len(active), self.batch_size):
                conts.extend(self.generator([s.text for s in active[i:i + self.batch_size]]))
            pending = []
            for st, cont in zip(active, conts):
                self._advance(st, cont, pending)
            if pending:
                with ThreadPoolExecutor(max_workers=min(self.max_workers, len(pending))) as pool:
                    futures = [(st, pool.submit(self._call_tool, getter, a, x, st.context)) for st, a, x in pending]
                    for st, fut in futures:
                        rec = fut.result()  # re-raises a tool crash
                        st.tool_calls.append(rec)
                        obs = rec["output"] if rec["ok"] else TOOL_FAILED_OBSERVATION
                        st.text += f" Observation: {obs}\n"
        for st in states:  # out of iterations: close the trace
            if not st.done:
                if START_WORK not in st.text[st.text.index(ASSISTANT_HEADER):]:
                    st.text += f"\n{START_WORK} Work:"
                st.done = True
        return states

    def _advance(self, st: _TraceState, cont: str, pending: list) -> None:
        eos = self.tokenizer.eos_token
        if cont.endswith(START_OBSERVATION):
            body = cont[: -len(START_OBSERVATION)]
            block = (st.text + body)[(st.text + body).rfind(START_TOOL):] if START_TOOL in st.text + body else body
            parsed = parse_action(block)
            if st.rounds >= self.max_rounds or parsed is None:
                # no more tool budget, or a call we cannot parse: record the failure and go to the rationale
                st.text += body + f"{START_OBSERVATION} Observation: {TOOL_FAILED_OBSERVATION}\n{START_WORK} Work:"
                st.tool_calls.append({"action": parsed[0] if parsed else None, "input": parsed[1] if parsed else body,
                                      "ok": False, "output": "", "latency_s": 0.0,
                                      "error": "tool budget exhausted" if parsed else "unparsable tool call"})
                st.forced_work = True
                return
            st.text += body + START_OBSERVATION
            st.rounds += 1
            pending.append((st, parsed[0], parsed[1]))
            return
        ended = bool(eos) and cont.endswith(eos)
        body = cont[: -len(eos)] if ended else cont
        assistant = st.text[st.text.index(ASSISTANT_HEADER):] + body
        if START_WORK in assistant:
            st.text += body
            st.done = True
        elif not st.forced_work:
            # "Finished" (no tool needed) or a trace that stopped without a rationale: ask for the rationale
            st.text += body + ("" if body.endswith("\n") else "\n") + f"{START_WORK} "
            st.forced_work = True
        else:
            st.text += body
            st.done = True

    def score(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> RewardOutput:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        n = len(prompts)
        contexts = list(columns.get("context") or [None] * n)
        samples = []
        for i in range(n):
            sample = {k: v[i] for k, v in columns.items() if isinstance(v, (list, tuple)) and len(v) == n}
            sample.update(question=prompts[i], answer=completions[i])
            samples.append(sample)
        states = self.run_traces(prompts, completions, contexts, samples)
        scores = self.score_texts([s.text for s in states])
        info = [{"trace": s.text[s.text.index(ASSISTANT_HEADER) + len(ASSISTANT_HEADER):], "tool_calls": s.tool_calls,
                 "rounds": s.rounds} for s in states]
        return RewardOutput(scores=scores, info=info)


# ----- creation / saving ------------------------------------------------------------------------------------

def create_themis(base_path: str | Path, dtype: str | None = None):
    """A fresh Themis RM from a causal-LM checkpoint: special tokens added, new v_head -> (ThemisModel, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_path))
    if tok.eos_token is None:
        raise ValueError(f"tokenizer at {base_path} has no eos token; Themis scores the hidden state of the final EOS")
    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    lm = AutoModelForCausalLM.from_pretrained(str(base_path), **kwargs)
    add_themis_tokens(tok, lm)
    return ThemisModel(lm), tok


def save_themis(model: ThemisModel, tokenizer, out_dir: str | Path, **meta: Any) -> None:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.lm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.v_head.state_dict().items()}, str(out / VALUE_HEAD_FILE))
    (out / THEMIS_META_FILE).write_text(json.dumps({"kind": "themis", **meta}, indent=2))


def load_themis(path: str | Path):
    """A directory written by save_themis -> (ThemisModel, tokenizer)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not (p / VALUE_HEAD_FILE).is_file():
        raise MissingFileError(f"{p} is not a Themis checkpoint (no {VALUE_HEAD_FILE}); train one with `align train-rm` and model.kind: themis")
    tok = AutoTokenizer.from_pretrained(str(p))
    model = ThemisModel(AutoModelForCausalLM.from_pretrained(str(p)))
    model.v_head.load_state_dict(load_file(str(p / VALUE_HEAD_FILE)))
    return model, tok


__all__ = ["ThemisModel", "ThemisRewardModel", "ThemisLossOptions", "HFGreedyGenerator", "encode_themis", "themis_loss",
           "pad_left", "parse_action", "add_themis_tokens", "create_themis", "save_themis", "load_themis", "ACTION_RE"]
