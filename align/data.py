"""Prompt datasets and a resumable sampler over them.

Prompts come from a JSONL/JSON file, a directory saved with `datasets.Dataset.save_to_disk`, or a
Hugging Face dataset name (loaded through `datasets`, offline cache only on our machines). Every other
column travels with the prompt and reaches the reward functions as a keyword argument (TRL's convention).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from align.config import DataConfig
from align.errors import UserError


def read_records(path: str, split: str = "train") -> list[dict[str, Any]]:
    p = Path(path)
    if p.is_file() and p.suffix in (".jsonl", ".json"):
        text = p.read_text()
        if p.suffix == ".json" and text.lstrip().startswith("["):
            return list(json.loads(text))
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}:{n}: not valid JSON ({err.msg}); each line must be one JSON object") from None
        return records
    if p.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise UserError(f"dataset {path!r} has no split {split!r} (splits: {', '.join(ds)}); set data.split")
            ds = ds[split]
        return [dict(r) for r in ds]
    if p.suffix in (".jsonl", ".json") or p.exists():
        raise UserError(f"data.path {path!r} does not exist")
    try:
        import datasets

        return [dict(r) for r in datasets.load_dataset(path, split=split)]
    except Exception as err:  # the hub is unreachable here; say what to do
        raise UserError(f"cannot load dataset {path!r} ({type(err).__name__}); give a local .jsonl file or a saved dataset directory") from None


class PromptDataset:
    """Records with a prompt column; prompts may be strings or chat messages (lists of {role, content})."""

    def __init__(self, cfg: DataConfig, tokenizer=None):
        self.cfg = cfg
        self.records = read_records(cfg.path, cfg.split)
        if not self.records:
            raise UserError(f"data.path {cfg.path!r} holds no records")
        missing = [i for i, r in enumerate(self.records) if cfg.prompt_key not in r]
        if missing:
            keys = ", ".join(sorted(self.records[missing[0]]))
            raise UserError(f"record {missing[0]} of {cfg.path!r} has no {cfg.prompt_key!r} column (columns: {keys}); set data.prompt_key")
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.records)

    def prompt_text(self, record: dict[str, Any]) -> str:
        prompt = record[self.cfg.prompt_key]
        if isinstance(prompt, list) and self.cfg.chat_template is False:
            raise UserError("data.chat_template is false but a prompt is a list of chat messages; remove "
                            "data.chat_template (or set it true) so the tokenizer's chat template renders it")
        if isinstance(prompt, list) or self.cfg.chat_template:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
                raise UserError("chat prompts need a tokenizer with a chat template; set data.chat_template=false and give plain text")
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(prompt)


@dataclass
class SamplerState:
    epoch: int = 0
    index: int = 0


class PromptSampler:
    """Yields prompts epoch by epoch in a seeded order; `state` is all that resume needs."""

    def __init__(self, dataset: PromptDataset, seed: int, shuffle: bool = True):
        self.dataset = dataset
        self.seed = seed
        self.shuffle = shuffle
        self.state = SamplerState()

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.dataset)))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.dataset), generator=g).tolist()

    def next(self, n: int) -> list[dict[str, Any]]:
        out = []
        order = self._order(self.state.epoch)
        while len(out) < n:
            if self.state.index >= len(order):
                self.state = SamplerState(self.state.epoch + 1, 0)
                order = self._order(self.state.epoch)
            out.append(self.dataset.records[order[self.state.index]])
            self.state.index += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.state.epoch, "index": self.state.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = SamplerState(int(state["epoch"]), int(state["index"]))


def columns_of(records: list[dict[str, Any]], prompt_key: str) -> dict[str, list[Any]]:
    """Every non-prompt column, as lists aligned with `records`."""
    keys = sorted({k for r in records for k in r if k != prompt_key})
    return {k: [r.get(k) for r in records] for k in keys}
