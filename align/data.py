"""Prompt datasets and a resumable sampler over them.

Prompts come from a JSONL/JSON/Parquet/CSV file, a directory saved with `datasets.Dataset.save_to_disk` (or
of data files), a Hugging Face dataset name (loaded through `datasets`, offline cache only on our machines), or
a `datasets.Dataset` / `IterableDataset` handed to `align.train(cfg, dataset=...)`. Every other
column travels with the prompt and reaches the reward functions as a keyword argument (TRL's convention).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from align.config import DataConfig
from align.errors import ConfigError, MissingFileError, UserError

IN_MEMORY = "<dataset argument>"  # data.path of a run whose data was `align.train(cfg, dataset=...)`
FILE_FORMATS = {".parquet": "parquet", ".csv": "csv"}  # read by `datasets`' own builders
SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes


def _read_json(p: Path) -> list[dict[str, Any]]:
    # stdlib json, not datasets' json builder: rows may mix types (an int answer here, a str there), which an
    # Arrow schema refuses, and a bad line is reported with its number
    text = p.read_text()
    if p.suffix == ".json" and text.lstrip().startswith("["):
        return list(json.loads(text))
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"{p}:{n}: not valid JSON ({err.msg}); each line must be one JSON object") from None
    return records


def _pick_split(ds: Any, split: str, where: str) -> Any:
    import datasets

    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in ds:
            raise UserError(f"dataset {where} has no split {split!r} (splits: {', '.join(ds)}); set data.split")
        return ds[split]
    return ds


def load_source(path: str, split: str = "train") -> Any:
    """A list of records or a `datasets` (Iterable)Dataset for `data.path`: a .jsonl/.json/.parquet/.csv file,
    a directory saved with `save_to_disk`, a directory of data files (verl's train.parquet / test.parquet), or
    a Hugging Face hub name (from the local cache when HF_HUB_OFFLINE=1)."""
    if path == IN_MEMORY:
        raise UserError("this run's data was given as align.train(config, dataset=...); pass the same dataset "
                        "again (resume included) or set data.path")
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix in (".jsonl", ".json"):
            return _read_json(p)
        if p.suffix not in FILE_FORMATS:
            raise UserError(f"data.path {path!r}: unknown file type {p.suffix!r}; give .jsonl, .json, .parquet or "
                            ".csv, a saved dataset directory or a hub dataset name")
        import datasets

        return datasets.load_dataset(FILE_FORMATS[p.suffix], data_files=str(p), split="train")
    if p.is_dir():
        import datasets

        if any((p / f).is_file() for f in SAVED_DATASET_FILES):
            return _pick_split(datasets.load_from_disk(str(p)), split, repr(path))
        try:
            return _pick_split(datasets.load_dataset(str(p)), split, repr(path))
        except (FileNotFoundError, ValueError) as err:  # datasets' "no data files" / "unknown format"
            raise UserError(f"data.path {path!r}: a directory with no readable data files ({err}); give a .jsonl, "
                            ".parquet or .csv file or a save_to_disk directory") from None
    if p.suffix in (".jsonl", ".json", *FILE_FORMATS) or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise MissingFileError(f"data.path {path!r} does not exist")
    try:
        import datasets

        return datasets.load_dataset(path, split=split)
    except Exception as err:  # noqa: BLE001 - offline or unknown name: say what to do in one line
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load dataset {path!r} ({first}); give a local data file or directory, or "
                        "download the dataset into the Hugging Face cache first") from None


def read_records(path: str, split: str = "train") -> list[dict[str, Any]]:
    """Every record of `data.path` as dicts (see `load_source`)."""
    source = load_source(path, split)
    return source if isinstance(source, list) else [dict(r) for r in source]


def with_verl_columns(record: dict[str, Any]) -> dict[str, Any]:
    """verl's layout (`reward_model: {ground_truth}`) gives rewards the `ground_truth` column they read
    (math_verify's answers); data_source / extra_info / reward_model travel on as columns of their own."""
    rm = record.get("reward_model")
    if isinstance(rm, dict) and "ground_truth" in rm and record.get("ground_truth") is None:
        return {**record, "ground_truth": rm["ground_truth"]}
    return record


def resolve_data_config(cfg: Any, dataset: Any) -> Any:
    """The run config with data.path resolved against `align.train(..., dataset=...)`: exactly one source."""
    path = cfg.data.path
    if dataset is None:
        if path == "<unset>":
            raise ConfigError("data.path is required (or pass align.train(config, dataset=...))")
        return cfg
    if path not in ("<unset>", IN_MEMORY):
        raise ConfigError(f"data.path is {path!r} and align.train got dataset= too; give the data once")
    # saved configs say where the data came from (resume needs the dataset passed again)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=IN_MEMORY))


class PromptDataset:
    """Records with a prompt column; prompts may be strings or chat messages (lists of {role, content}).

    source: None (read `cfg.path`), a `datasets.Dataset` / `DatasetDict` (cfg.split is taken) / list of
    dicts, or a `datasets.IterableDataset` (streamed: `stream` is set and `records` is None)."""

    def __init__(self, cfg: DataConfig, tokenizer=None, source: Any = None):
        import datasets

        self.cfg = cfg
        self.tokenizer = tokenizer
        where = repr(cfg.path) if source is None else "dataset="
        if source is None:
            source = load_source(cfg.path, cfg.split)
        source = _pick_split(source, cfg.split, where)
        self.stream = None
        self.records: list[dict[str, Any]] | None = None
        if isinstance(source, datasets.IterableDataset):
            self.stream = source
            first = next(iter(source.take(1)), None)
            sample = [] if first is None else [dict(first)]
        elif isinstance(source, (datasets.Dataset, list)):
            self.records = sample = [with_verl_columns(dict(r)) for r in source]
        else:
            raise UserError(f"dataset= must be a datasets.Dataset, IterableDataset, DatasetDict or a list of dicts; "
                            f"got {type(source).__name__}")
        if not sample:
            raise UserError(f"data {where} holds no records")
        self.columns = sorted({k for r in sample for k in with_verl_columns(r)})
        missing = [i for i, r in enumerate(sample) if cfg.prompt_key not in r]
        if missing:
            keys = ", ".join(sorted(sample[missing[0]]))
            raise UserError(f"record {missing[0]} of {where} has no {cfg.prompt_key!r} column (columns: {keys}); set data.prompt_key")

    def __len__(self) -> int:
        if self.records is None:
            raise TypeError("a streamed dataset has no length")
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


class _Resumable:
    """A sampler's resume state: (epoch, index into that epoch's order)."""

    state: SamplerState

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.state.epoch, "index": self.state.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = SamplerState(int(state["epoch"]), int(state["index"]))


class PromptSampler(_Resumable):
    """Yields prompts epoch by epoch in a seeded order; `state` is all that resume needs."""

    def __init__(self, dataset: PromptDataset, seed: int, shuffle: bool = True):
        self.dataset = dataset
        self.seed = seed
        self.shuffle = shuffle
        self.state = SamplerState()
        self._cached: tuple[int, list[int]] | None = None  # (epoch, its order)

    def _order(self, epoch: int) -> list[int]:
        # built once per epoch: a fresh permutation every step cost O(dataset) per step (49 ms at 1M prompts)
        if self._cached is None or self._cached[0] != epoch:
            if not self.shuffle:
                order = list(range(len(self.dataset)))
            else:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order = torch.randperm(len(self.dataset), generator=g).tolist()
            self._cached = (epoch, order)
        return self._cached[1]

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


class StreamSampler(_Resumable):
    """PromptSampler's contract over a `datasets.IterableDataset`: epoch e reads the stream shuffled with
    seed + e (datasets' buffer shuffle), and resume skips the `index` records already drawn in that epoch."""

    def __init__(self, dataset: PromptDataset, seed: int, shuffle: bool = True, buffer_size: int = 1000):
        self.dataset = dataset
        self.seed = seed
        self.shuffle = shuffle
        self.buffer_size = buffer_size
        self.state = SamplerState()
        self._it = None

    def _open(self):
        stream = self.dataset.stream
        if self.shuffle:
            stream = stream.shuffle(seed=self.seed * 1_000_003 + self.state.epoch, buffer_size=self.buffer_size)
        return iter(stream.skip(self.state.index) if self.state.index else stream)

    def next(self, n: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self._it is None:
            self._it = self._open()
        while len(out) < n:
            try:
                record = next(self._it)
            except StopIteration:
                if self.state.index == 0:
                    raise UserError("the streamed dataset yielded no records") from None
                self.state = SamplerState(self.state.epoch + 1, 0)
                self._it = self._open()
                continue
            out.append(with_verl_columns(dict(record)))
            self.state.index += 1
        return out

    def load_state_dict(self, state: dict[str, int]) -> None:
        super().load_state_dict(state)
        self._it = None


def make_sampler(dataset: PromptDataset, seed: int, shuffle: bool = True) -> PromptSampler | StreamSampler:
    if dataset.stream is not None:
        return StreamSampler(dataset, seed, shuffle)
    return PromptSampler(dataset, seed, shuffle)


def columns_of(records: list[dict[str, Any]], prompt_key: str) -> dict[str, list[Any]]:
    """Every non-prompt column, as lists aligned with `records`."""
    keys = sorted({k for r in records for k in r if k != prompt_key})
    return {k: [r.get(k) for r in records] for k in keys}
