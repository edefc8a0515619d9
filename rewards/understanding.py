"""GvU: a unified multimodal model's own understanding branch as the reward for its image generation.

R(T, I) = (prod_j p(T_j | I, instruction, T_<j))^(1/L) = exp(mean_j log p_j), in (0, 1]   (Pan et al., CVPR 2026,
arXiv 2603.06043, PAPERS.md §3), computed in log space from one batched teacher-forced pass over
`<boi> I <eoi> instruction T`. The scorer is the policy itself (the released code's choice, the default) or
a frozen teacher: the same model with its LoRA adapters disabled, or a model loaded from `model_path`.

The reward reads the image from `completion_ids` (the K sampled image tokens, as the trainer passes them) and
the text from the `caption` column, or else from the prompt without its image-request suffix (" <boi>").
Per-token log-probs go to `info`. Other rewards can be mixed in: score = w_u * R + sum_i w_i * r_i.

The UMM layout (`umm` section of config.json) is defined, written and read by `align.rollouts.umm`
(`make_umm_layout`, `umm_layout`): num_image_tokens, image_token_ids, boi_token_id, eoi_token_id,
prompt_suffix, instruction.
Any object with `score_text(image_ids [N, K], texts) -> N tensors [L_i]` (e.g. `align.rollouts.umm.JanusUMM`)
can be passed as `umm=` instead.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import torch

from align.rewards.base import RewardFunction, RewardOutput, as_reward_function
from align.rollouts.umm import umm_layout


def understanding_logprobs(model, rows: Sequence[Sequence[int]], starts: Sequence[int], pad_token_id: int) -> list[torch.Tensor]:
    """Teacher-forced log p(row[t] | row[:t]) for t >= start, one right-padded forward pass.

    rows: N token-id lists; starts: N indices (>= 1) where the scored text begins. Returns N float32 tensors
    [len_i - start_i]. Only the text positions' logits are normalised (the image part is never upcast).
    """
    device = next(model.parameters()).device
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long, device=device)
    att = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        att[i, :len(r)] = 1
    first = min(starts) - 1  # logits before this position predict image / instruction tokens only
    logits = model(input_ids=ids, attention_mask=att).logits[:, first:-1]  # [N, T-1-first, V]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, first + 1:].unsqueeze(-1)).squeeze(-1)
    return [logp[i, s - 1 - first:len(r) - 1 - first] for i, (r, s) in enumerate(zip(rows, starts))]


class UnderstandingReward(RewardFunction):
    """GvU's understanding reward. `scorer`: "policy" (default) | "teacher" (adapters disabled / `model_path`).

    Use inside the trainer: it calls `bind_policy(model, tokenizer, disable_adapters)` once at start.
    Standalone: `UnderstandingReward(model_path=...)` loads the scorer itself.
    """

    name = "gvu_understanding"

    def __init__(self, model_path: str | None = None, scorer: str = "policy", *, umm: Any = None,
                 caption_column: str = "caption", batch_size: int = 64, understanding_weight: float = 1.0,
                 mix: Sequence[tuple[Any, float]] = (), device: str | None = None):
        if scorer not in ("policy", "teacher"):
            raise ValueError(f"UnderstandingReward: scorer must be 'policy' or 'teacher', got {scorer!r}")
        if batch_size < 1:
            raise ValueError(f"UnderstandingReward: batch_size must be >= 1, got {batch_size}")
        self.scorer = scorer
        self.caption_column = caption_column
        self.batch_size = int(batch_size)
        self.understanding_weight = float(understanding_weight)
        self.mix = [(as_reward_function(fn), float(w)) for fn, w in mix]
        self.model = None
        self.tokenizer = None
        self.layout: dict | None = None
        self.disable_adapters: Callable[[], Any] | None = None
        self.umm = umm
        self.model_path = model_path
        if model_path is not None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(model_path).eval()
            if device:
                model.to(device)
            model.requires_grad_(False)
            self._bind(model, AutoTokenizer.from_pretrained(model_path), None)

    # -------------------------------------------------------------------------------------------- binding
    def _bind(self, model, tokenizer, disable_adapters) -> None:
        self.model, self.tokenizer, self.disable_adapters = model, tokenizer, disable_adapters
        self.layout = umm_layout(model)
        self._instruction_ids = tokenizer(self.layout["instruction"], add_special_tokens=False)["input_ids"]
        self._image_ids = {int(t) for t in self.layout["image_token_ids"]}

    def bind_policy(self, model, tokenizer, disable_adapters: Callable[[], Any] | None = None) -> None:
        """Called once by the trainer. disable_adapters: a context-manager factory (e.g. peft's
        `model.disable_adapter`) used for scorer="teacher". A reward built from `model_path` keeps its own model."""
        if self.model_path is not None or self.umm is not None:
            return
        if self.scorer == "teacher" and disable_adapters is None:
            raise ValueError("UnderstandingReward(scorer='teacher') needs LoRA (the trainer passes disable_adapters) "
                             "or model_path=<frozen teacher>; use scorer='policy' for a full fine-tune")
        self._bind(model, tokenizer, disable_adapters)

    # ------------------------------------------------------------------------------------------- scoring
    def _texts(self, prompts: Sequence[str], columns: dict) -> list[str]:
        if self.caption_column in columns:
            return [str(t) for t in columns[self.caption_column]]
        suffix = self.layout["prompt_suffix"] if self.layout else ""
        return [p[: len(p) - len(suffix)] if suffix and p.endswith(suffix) else p for p in prompts]

    def _scoring_context(self):
        if self.scorer == "teacher" and self.disable_adapters is not None:
            return self.disable_adapters()
        return contextlib.nullcontext()

    def text_logprobs(self, image_ids: Sequence[Sequence[int]], texts: Sequence[str]) -> list[torch.Tensor]:
        """Per-token log p(T_j | image, instruction, T_<j) for N (image, text) pairs, in batches."""
        if self.umm is not None:
            return [t.float() for t in self.umm.score_text(torch.as_tensor(image_ids), texts)]
        if self.model is None:
            raise RuntimeError("UnderstandingReward has no scorer: pass model_path= or umm=, or let the trainer call bind_policy()")
        layout = self.layout
        rows, starts = [], []
        for img, text in zip(image_ids, texts):
            text_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if not text_ids:
                raise ValueError("UnderstandingReward: empty caption; give every prompt a caption to score")
            head = [int(layout["boi_token_id"])] + [int(t) for t in img] + [int(layout["eoi_token_id"])] + self._instruction_ids
            rows.append(head + text_ids)
            starts.append(len(head))
        was_training = self.model.training
        self.model.eval()
        out: list[torch.Tensor] = []
        try:
            # a policy that reads images itself (align.rollouts.janus.JanusImageLM: Janus' vision encoder)
            own = getattr(self.model, "score_text", None)
            with torch.no_grad(), self._scoring_context():
                for lo in range(0, len(rows), self.batch_size):
                    if own is not None:
                        out += [t.float() for t in own(list(image_ids)[lo:lo + self.batch_size], list(texts)[lo:lo + self.batch_size])]
                        continue
                    out += understanding_logprobs(self.model, rows[lo:lo + self.batch_size], starts[lo:lo + self.batch_size],
                                                  self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        finally:
            self.model.train(was_training)
        return [t.cpu() for t in out]

    def score(self, prompts: Sequence[str], completions: Sequence[str], completion_ids=None, **columns) -> RewardOutput:
        n = len(completions)
        if completion_ids is None:
            raise ValueError("UnderstandingReward scores image tokens: pass completion_ids (the sampled image token ids)")
        if len(completion_ids) != n:
            raise ValueError(f"UnderstandingReward: {len(completion_ids)} completion_ids for {n} completions")
        texts = self._texts(prompts, columns)
        errors: list[str | None] = [None] * n
        images: list[list[int]] = []
        k = int(self.layout["num_image_tokens"]) if self.layout else None
        for i, ids in enumerate(completion_ids):
            ids = [int(t) for t in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
            if k is not None and (len(ids) != k or any(t not in self._image_ids for t in ids)):
                errors[i] = f"not an image: expected {k} image tokens, got {len(ids)} tokens"
            images.append(ids)
        valid = [i for i in range(n) if errors[i] is None]
        scores: list[float | None] = [None] * n
        info: list[dict] = [{} for _ in range(n)]
        if valid:
            lps = self.text_logprobs([images[i] for i in valid], [texts[i] for i in valid])
            for i, lp in zip(valid, lps):
                mean = float(lp.double().mean())
                scores[i] = math.exp(mean)  # exp(mean log p) in (0, 1]: the geometric mean of p_j
                info[i] = {"understanding": scores[i], "mean_logprob": mean, "token_logprobs": lp.tolist(), "text": texts[i]}
        if self.mix or self.understanding_weight != 1.0:
            scores = self._mixed(scores, errors, info, prompts, completions, completion_ids, columns)
        return RewardOutput(scores=scores, errors=errors, info=info)

    def _mixed(self, scores, errors, info, prompts, completions, completion_ids, columns):
        total = [None if s is None else self.understanding_weight * s for s in scores]
        for fn, w in self.mix:
            part = fn.score(prompts, completions, completion_ids=completion_ids, **columns)
            for i, v in enumerate(part.scores):
                if total[i] is None:
                    continue
                if v is None:
                    errors[i] = f"mixed reward {fn.name!r} gave no score: {part.errors[i] or 'not applicable'}"
                    total[i] = None
                else:
                    info[i][fn.name] = v
                    total[i] += w * v
        return total
