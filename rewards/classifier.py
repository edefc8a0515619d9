"""Classifier reward model: a scalar score for prompt + completion from any Hugging Face model.

Two heads, chosen from the checkpoint:
- "sequence_classification": `AutoModelForSequenceClassification` with one label (encoders pool [CLS],
  decoders take the last non-pad token, as transformers implements them);
- "value_head": a backbone (`AutoModel`, e.g. a causal LM's decoder) + `Linear(hidden, 1, bias=False)` on the
  hidden state of the last non-pad token (the Themis / InstructGPT reward head).
A bare encoder or causal-LM checkpoint is turned into a fresh RM (the head is newly initialised); a directory
written by `save_pretrained` loads back with its head.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from align.algos.positions import position_ids_from_mask
from align.rewards.base import RewardFunction, RewardOutput

HEADS = ("auto", "sequence_classification", "value_head")
VALUE_HEAD_FILE = "value_head.safetensors"
RM_META_FILE = "reward_model.json"


class ValueHeadModel(nn.Module):
    """backbone + v_head = Linear(hidden, 1, bias=False) applied at the last attended token."""

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.v_head = nn.Linear(hidden_size, 1, bias=False)
        nn.init.normal_(self.v_head.weight, std=1.0 / (hidden_size + 1) ** 0.5)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: [B, T] (left or right padding) -> rewards [B]."""
        # position ids from the mask keep a row's score independent of how much padding it got
        position_ids = position_ids_from_mask(attention_mask)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        hidden = out.last_hidden_state  # [B, T, H]
        last = last_token_index(attention_mask)  # [B]
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.v_head(pooled).squeeze(-1)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] 0/1 mask -> [B] index of the last 1 in each row (works for left and right padding)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer at {path} has neither a pad nor an eos token; add a pad token to it")
        tok.pad_token = tok.eos_token
    return tok


def _saved_meta(path: str | Path) -> dict:
    """The settings save_pretrained wrote beside a checkpoint ({} for a plain hub / HF directory)."""
    meta_file = Path(path) / RM_META_FILE
    return json.loads(meta_file.read_text()) if meta_file.is_file() else {}


def _detect_head(path: Path, config) -> str:
    if (path / VALUE_HEAD_FILE).is_file():
        return "value_head"
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "sequence_classification"
    if any(a.endswith("ForCausalLM") for a in archs):
        return "value_head"
    return "sequence_classification"


class ClassifierRewardModel(RewardFunction):
    """A RewardFunction scoring `template.format(prompt=..., completion=...)` with a classifier RM.

    model_path: a local directory or hub name (sequence-classification, causal LM or encoder checkpoint).
    template: how prompt and completion are joined into the text the model reads.
    """

    name = "classifier_rm"

    def __init__(self, model_path: str | None = None, *, model: nn.Module | None = None, tokenizer: Any = None,
                 head: str = "auto", template: str | None = None, batch_size: int = 16,
                 max_length: int | None = None, device: str | None = None, dtype: str | None = None,
                 add_eos: bool | None = None):
        # a checkpoint written by save_pretrained / `align train-rm` carries the template, length and EOS rule it
        # was trained with: scoring with other text than it was trained on would silently score noise
        saved = _saved_meta(model_path) if model is None and model_path is not None else {}
        template = template if template is not None else saved.get("template", "{prompt}{completion}")
        max_length = int(max_length if max_length is not None else saved.get("max_length", 512))
        add_eos = bool(add_eos if add_eos is not None else saved.get("add_eos", False))
        if head not in HEADS:
            raise ValueError(f"head={head!r}: choose one of {', '.join(HEADS)}")
        if batch_size < 1 or max_length < 8:
            raise ValueError("batch_size must be >= 1 and max_length >= 8")
        if "{prompt}" not in template or "{completion}" not in template:
            raise ValueError(f"template {template!r} must contain {{prompt}} and {{completion}}")
        self.template, self.batch_size, self.max_length, self.add_eos = template, batch_size, max_length, add_eos
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if model is not None:
            if tokenizer is None:
                raise ValueError("pass tokenizer= together with model=")
            self.model, self.tokenizer = model, tokenizer
            self.head = "value_head" if isinstance(model, ValueHeadModel) else "sequence_classification"
        else:
            if model_path is None:
                raise ValueError("ClassifierRewardModel needs model_path or model=")
            self.model, self.tokenizer, self.head = self._load(str(model_path), head, dtype)
        self.model.to(self.device)
        self.model.eval()

    # ----- loading / saving -------------------------------------------------------------------------------

    @staticmethod
    def _load(path: str, head: str, dtype: str | None):
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

        torch_dtype = getattr(torch, dtype) if dtype else None
        tok = _load_tokenizer(path)
        config = AutoConfig.from_pretrained(path)
        p = Path(path)
        meta = _saved_meta(path)
        if head == "auto":
            head = meta.get("head") or _detect_head(p, config)
        kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
        if head == "sequence_classification":
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
            if model.config.pad_token_id is None:
                model.config.pad_token_id = tok.pad_token_id
        else:
            backbone = AutoModel.from_pretrained(path, **kwargs)
            hidden = getattr(backbone.config, "hidden_size", None) or backbone.config.get_text_config().hidden_size
            model = ValueHeadModel(backbone, hidden)
            if (p / VALUE_HEAD_FILE).is_file():
                from safetensors.torch import load_file

                model.v_head.load_state_dict(load_file(str(p / VALUE_HEAD_FILE)))
            if torch_dtype is not None:
                model.v_head.to(torch_dtype)
        return model, tok, head

    def save_pretrained(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if isinstance(self.model, ValueHeadModel):
            from safetensors.torch import save_file

            self.model.backbone.save_pretrained(out)
            save_file({k: v.detach().contiguous().cpu() for k, v in self.model.v_head.state_dict().items()}, str(out / VALUE_HEAD_FILE))
        else:
            self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        meta = {"head": self.head, "template": self.template, "max_length": self.max_length, "add_eos": self.add_eos}
        (out / RM_META_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "ClassifierRewardModel":
        """Load a directory written by save_pretrained, keeping its template / max_length unless overridden
        (the constructor does the same for a model_path; kept for the transformers-style spelling)."""
        return cls(str(path), **kwargs)

    # ----- scoring --------------------------------------------------------------------------------------

    def _with_eos(self, texts: Sequence[str]) -> list[str]:
        if self.add_eos and self.tokenizer.eos_token:
            return [t + self.tokenizer.eos_token for t in texts]
        return list(texts)

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Each text's token count as `encode` builds it, before its cut at max_length (which keeps the start)."""
        return [len(ids) for ids in self.tokenizer(self._with_eos(texts))["input_ids"]]

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """texts -> right-padded input_ids / attention_mask [B, T] on the model's device."""
        batch = self.tokenizer(self._with_eos(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        return {"input_ids": batch["input_ids"].to(self.device), "attention_mask": batch["attention_mask"].to(self.device)}

    def forward_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B] rewards, differentiable (used by training)."""
        if isinstance(self.model, ValueHeadModel):
            return self.model(input_ids, attention_mask)
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]

    @torch.no_grad()
    def score_texts(self, texts: Sequence[str]) -> list[float]:
        self.model.eval()
        scores: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.encode(texts[i:i + self.batch_size])
            scores.extend(self.forward_scores(**enc).float().cpu().tolist())
        return scores

    def format(self, prompt: str, completion: str) -> str:
        return self.template.format(prompt=prompt, completion=completion)

    def score(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> RewardOutput:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        texts = [self.format(p, c) for p, c in zip(prompts, completions)]
        return RewardOutput(scores=list(self.score_texts(texts)))


__all__ = ["ClassifierRewardModel", "ValueHeadModel", "last_token_index", "HEADS"]
