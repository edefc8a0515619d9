"""Themis: a tool-augmented reward model (Li, Chai, Wang et al., ICLR 2024; PAPERS.md section 1).

Before scoring an answer the model writes a trace: it calls tools (`<start_tool> Thought/Action/Action Input`),
reads their observations (`<start_observation> Observation: ...`), writes a rationale (`<start_work> Work: ...`)
and ends with EOS; `v_head = Linear(hidden, 1, bias=False)` on the final EOS hidden state is the score.

Pieces: `ThemisModel` (causal LM + value head), `encode_themis` (token ids + per-token loss weights with the
released code's masking), `themis_loss` (lm_coef * token-mean CE + rm_coef * Bradley-Terry), and
`ThemisRewardModel`, a RewardFunction whose greedy traces run in the rollout engine's tool episodes
(align.rewards.themis_traces: token-in token-out, the tool calls of a round concurrent), with a score cache.
"""
from __future__ import annotations

import copy
import json
import random
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from align.algos.positions import position_ids_from_mask
from align.errors import MissingFileError
from align.rewards.base import RewardFunction, RewardOutput
from align.rewards.classifier import last_token_index
from align.rewards.tara import ThemisSegments, render_user
from align.rewards.themis_traces import ThemisTracer, Trace, cache_key
from align.tools.executor import ResultCache
from align.tools.trace import ACTION_RE, START_TOOL, START_WORK, THEMIS_SPECIAL_TOKENS
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


def themis_token_lengths(tokenizer, segs: Sequence[ThemisSegments]) -> list[int]:
    """Each sequence's length as `encode_themis` builds it (the text's ids, then the EOS), before its cut at
    max_length (which keeps the end)."""
    return [len(ids) + 1 for ids in tokenizer([s.text for s in segs], add_special_tokens=True)["input_ids"]]


def pad_left(rows: Sequence[Sequence[float]], pad_value: float, dtype=torch.long) -> torch.Tensor:
    """Rows of different lengths -> [B, T] left-padded tensor."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_value, dtype=dtype)
    for i, r in enumerate(rows):
        if len(r):
            out[i, width - len(r):] = torch.tensor(list(r), dtype=dtype)
    return out


def themis_loss(logits: torch.Tensor, input_ids: torch.Tensor, weights: torch.Tensor, rewards: torch.Tensor,
                lm_coef: float = 1.0, rm_coef: float = 0.5, token_total: float | None = None,
                pair_total: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Released Themis loss: lm_coef * token-mean CE + rm_coef * mean(-log sigmoid(r_pos - r_neg)).

    logits [2B, T, V], input_ids [2B, T], weights [2B, T] (0 = not supervised), rewards [2B] with the B
    positives first. Token t is predicted from position t-1. (Released main.py / reward_model.py; the
    paper's form is lm_coef = alpha, rm_coef = 1.)
    token_total / pair_total: the supervised-token weight and the pairs of the whole data-parallel batch
    (default: this batch's), so that the ranks' losses sum to the loss of the whole batch
    (align.rewards.data_parallel); lm_loss / rm_loss are then this rank's shares.
    """
    shift_logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    w = weights[:, 1:].to(shift_logits.dtype)
    ce = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), targets.reshape(-1), reduction="none").view_as(w)
    tokens = w.sum() if token_total is None else torch.tensor(float(token_total), dtype=shift_logits.dtype, device=w.device)
    lm = (ce * w).sum() / tokens.clamp(min=1e-8)
    b = rewards.shape[0] // 2
    rm = -F.logsigmoid(rewards[:b].float() - rewards[b:].float()).sum() / (pair_total or b)
    loss = lm_coef * lm + rm_coef * rm
    acc = (rewards[:b] > rewards[b:]).float().mean()
    return loss, {"lm_loss": float(lm.detach()), "rm_loss": float(rm.detach()), "pair_acc": float(acc)}


# ----- the reward function ----------------------------------------------------------------------------------

class ThemisRewardModel(RewardFunction):
    """Tool-augmented RM. For each (prompt, completion): question = prompt, answer = completion (context from
    a `context` column if given); a greedy trace with tools in the rollout engine (align.rewards.themis_traces:
    at most `max_rounds` calls, the rationale forced where the trace has none, EOS), then the v_head score of
    the final EOS of exactly the ids generated and appended.

    tools: None (align.tools' registry), a {name: tool} mapping, or a callable name -> tool; a tool is
    `tool(input, context=sample) -> ToolResult(ok, output, error, latency_s)`, the sample being the row's
    columns plus question and answer. Calls of one round run concurrently (`max_workers` threads, each call
    `tool_timeout_s`). max_new_tokens: tokens per tool round and for the rationale; max_length: the scored
    window (the last this many ids). cache_size: finished scores kept for repeated (question, answer,
    columns) samples (LRU; 0 = off); a hit skips generation. info[i]: trace, tool_calls, rationale,
    stop_reason, rounds, cached. rationale: False scores right after the last observation (a model trained with
    omega = 0, the released `--no_work`); None reads it from the checkpoint's themis.json (True if absent).
    """

    name = "themis"

    def __init__(self, model_path: str | None = None, *, model: ThemisModel | None = None, tokenizer: Any = None,
                 tools: Any = None, max_rounds: int = 3, max_new_tokens: int = 128, max_length: int = 1024,
                 batch_size: int = 8, max_workers: int = 8, tool_timeout_s: float = 30.0,
                 max_observation_tokens: int = 256, cache_size: int = 1024, device: str | None = None,
                 rationale: bool | None = None):
        if max_rounds < 0 or max_new_tokens < 1 or batch_size < 1 or cache_size < 0:
            raise ValueError("max_rounds and cache_size must be >= 0, max_new_tokens and batch_size >= 1")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if model is None:
            if model_path is None:
                raise ValueError("ThemisRewardModel needs model_path or model= and tokenizer=")
            model, tokenizer = load_themis(model_path)
            if rationale is None:
                rationale = bool(themis_meta(model_path).get("rationale", True))
        elif tokenizer is None:
            raise ValueError("pass tokenizer= together with model=")
        self.model, self.tokenizer = model.to(self.device).eval(), tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        self.tracer = ThemisTracer(self.model.lm, tokenizer, tools=tools, max_rounds=max_rounds,
                                   max_new_tokens=max_new_tokens, max_observation_tokens=max_observation_tokens,
                                   batch_size=batch_size, max_workers=max_workers, tool_timeout_s=tool_timeout_s,
                                   rationale=True if rationale is None else bool(rationale))
        self.cache = ResultCache(cache_size) if cache_size else None
        self._lock = threading.Lock()  # one batch at a time: the engine is not reentrant

    # ----- scoring of finished sequences --------------------------------------------------------------

    @torch.no_grad()
    def score_ids(self, rows: Sequence[Sequence[int]]) -> list[float]:
        """Token-id sequences ending in EOS -> v_head score at that EOS (the last `max_length` ids of each row),
        batched with left padding."""
        scores: list[float] = []
        for i in range(0, len(rows), self.batch_size):
            part = [list(r)[-self.max_length:] for r in rows[i:i + self.batch_size]]
            ids = pad_left(part, self.tokenizer.pad_token_id).to(self.device)
            mask = pad_left([[1] * len(r) for r in part], 0).to(self.device)
            _, rewards = self.model(ids, mask, with_logits=False)
            scores.extend(rewards.float().cpu().tolist())
        return scores

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        """Full sequences (without EOS; training's encoding: BOS, EOS appended) -> v_head score at the EOS."""
        tok = self.tokenizer
        return self.score_ids([tok(t, add_special_tokens=True)["input_ids"] + [tok.eos_token_id] for t in texts])

    # ----- traces -----------------------------------------------------------------------------------

    def run_traces(self, questions: Sequence[str], answers: Sequence[str], contexts: Sequence[str | None],
                   samples: Sequence[dict[str, Any]]) -> list[Trace]:
        """The traces of N samples (align.rewards.themis_traces), uncached."""
        prompts = [render_user(q, a, c) + ASSISTANT_HEADER for q, a, c in zip(questions, answers, contexts)]
        return self.tracer.run(prompts, list(samples))

    def _info(self, trace: Trace) -> dict[str, Any]:
        tok, work = self.tokenizer, self.tracer.work_id
        body = trace.ids[:-1]  # the scored EOS is not part of the text
        at = max((k for k, t in enumerate(body) if t == work), default=None)
        rationale = "" if at is None else _WORK_PREFIX.sub("", tok.decode(body[at + 1:], skip_special_tokens=True), count=1).strip()
        return {"trace": tok.decode(body, skip_special_tokens=False), "tool_calls": trace.tool_calls,
                "rationale": rationale, "stop_reason": trace.stop_reason,
                "rounds": sum(c["action"] is not None and c["error"] != "tool budget exhausted" for c in trace.tool_calls)}

    def score(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> RewardOutput:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        n = len(prompts)
        contexts = list(columns.get("context") or [None] * n)
        samples, keys = [], []
        for i in range(n):
            sample = {k: v[i] for k, v in columns.items() if isinstance(v, (list, tuple)) and len(v) == n}
            sample.update(question=prompts[i], answer=completions[i])
            samples.append(sample)
            keys.append(cache_key(prompts[i], completions[i], sample))
        with self._lock:
            done: dict[tuple, tuple[float, dict]] = {}
            first: dict[tuple, int] = {}  # a sample to trace -> its first row (repeats in the batch reuse it)
            for i, key in enumerate(keys):
                if key in done or key in first:
                    continue
                got = self.cache.get(ResultCache.key(*key)) if self.cache is not None else None
                if got is not None:
                    done[key] = got
                else:
                    first[key] = i
            run = list(first.values())
            if run:
                traces = self.run_traces([prompts[i] for i in run], [completions[i] for i in run],
                                         [contexts[i] for i in run], [samples[i] for i in run])
                scores = self.score_ids([t.prompt_ids + t.ids for t in traces])
                for i, t, s in zip(run, traces, scores):
                    done[keys[i]] = (s, self._info(t))
                    if self.cache is not None:
                        self.cache.put(ResultCache.key(*keys[i]), done[keys[i]])
        ran = set(run)
        out_scores, info = [], []
        for i, key in enumerate(keys):
            s, inf = done[key]
            out_scores.append(s)
            info.append({**copy.deepcopy(inf), "cached": i not in ran})
        return RewardOutput(scores=out_scores, info=info,
                            metrics={"themis/cache_hits": float(n - len(run)), "themis/cache_misses": float(len(run))})


_WORK_PREFIX = re.compile(r"^\s*Work\s*:")


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


def themis_meta(path: str | Path) -> dict[str, Any]:
    """The training settings save_themis recorded (themis.json), {} for a checkpoint without them."""
    f = Path(path) / THEMIS_META_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


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


__all__ = ["ThemisModel", "ThemisRewardModel", "ThemisLossOptions", "encode_themis", "themis_token_lengths", "themis_loss",
           "pad_left", "parse_action", "add_themis_tokens", "create_themis", "save_themis", "load_themis", "themis_meta", "ACTION_RE"]
