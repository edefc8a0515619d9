"""Checkpoints of a multi-rank run: sharded model and optimizer state through torch.distributed.checkpoint (DCP).

Layout of `checkpoints/step-NNNNNN/` when the run has several ranks (one process keeps align.checkpoint's format):

    config.json, *.safetensors     the full policy (adapters only with LoRA), gathered from the shards by rank 0:
    tokenizer files                the same from_pretrained directory a one-process run writes
    trainer.pt                     what is global, once (step, scheduler, data cursor, minibatch generator, RNG, ...)
    align_config.json
    shards/                        DCP: policy + value head + critic + optimizer, each rank its own shard file

DCP keys tensors by parameter name and records each shard's place in the full tensor, so a checkpoint saved at N
ranks loads at M (1 included): `get_state_dict` / `set_state_dict` convert between the full names and whatever
sharding (FSDP2 or none) the loading run uses.

Safe loading: DCP's `.metadata` is a pickle, and torch's `FileSystemReader.read_metadata` reads it with plain
`pickle.load` (torch 2.13), so a crafted file would run code on load. `SafeFileSystemReader` reads it through an
unpickler that resolves only DCP's metadata classes, torch.Size, dtypes, layouts and paths; anything else is
refused with a one-line CheckpointError before any tensor is read. (Tensor data needs no pickle; DCP's bytes
entries are read with `torch.load(weights_only=True)`.)
"""
from __future__ import annotations

import hashlib
import io
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from align.distributed.context import DistContext
from align.errors import CheckpointError

SHARDS_DIR = "shards"
METADATA_FILE = ".metadata"

# What a DCP .metadata written by torch's FileSystemWriter needs, and nothing that can run code: dataclasses
# and an Enum of DCP (their constructors and __setstate__ only store fields), torch.Size, and lookups of
# existing dtype / layout objects by name.
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "StorageMeta", "TensorStorageMetadata",
                                              "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                              "MetadataIndex", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice", "complex"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def read_metadata(path: str | Path) -> Metadata:
    """A DCP `.metadata` file through the restricted unpickler: a Metadata, or a one-line CheckpointError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot resume: {path} cannot be read ({err.strerror}); the sharded checkpoint is "
                              "incomplete: resume from an earlier one") from None
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"cannot resume: {path} needs {err}, which is not part of a DCP checkpoint's metadata, "
                              "so it was not loaded (it could run code); resume only from checkpoints align wrote") from None
    except Exception as err:  # truncated or garbage
        raise CheckpointError(f"cannot resume: {path} is corrupt ({type(err).__name__}: {str(err)[:120]})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"cannot resume: {path} holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """torch's FileSystemReader with `read_metadata` through the restricted unpickler (module docstring)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        metadata = read_metadata(path)
        if getattr(metadata, "storage_meta", None) is None:  # as torch's reader does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but its non-tensor entries (optimizer hyper-parameters, ...) are read with
    `torch.load(weights_only=True)`: torch 2.13's `DefaultLoadPlanner.load_bytes` uses weights_only=False, so a
    crafted shard file could otherwise run code too."""

    def __init__(self, source: Path, **kwargs: Any):
        super().__init__(**kwargs)
        self.source = source

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
            what = found.group(1) if found else "an object that is not plain data"
            raise CheckpointError(f"cannot resume: entry {fqn!r} of the shards in {self.source} holds {what}, so it was "
                                  "not loaded (it could run code); resume only from checkpoints align wrote") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def model_container(policy: nn.Module, value_head: nn.Module | None = None,
                    critic: nn.Module | None = None) -> nn.ModuleDict:
    """One module over everything the optimizer steps, so one `get_state_dict` names every parameter and its
    optimizer state ("policy.model.layers.0...", "critic.backbone..."); the modules themselves are unchanged."""
    parts = {"policy": policy, "value_head": value_head, "critic": critic}
    return nn.ModuleDict({k: v for k, v in parts.items() if v is not None})


def save_shards(folder: Path, container: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Every rank writes its shard of the model (and optimizer) state into `folder` (collective)."""
    if optimizer is None:
        state: dict[str, Any] = {"model": get_model_state_dict(container)}
    else:
        model_sd, optim_sd = get_state_dict(container, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
    dcp.save(state, storage_writer=FileSystemWriter(folder, sync_files=True))  # sync_files: each rank fsyncs its own


def load_shards(folder: Path, container: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load `folder` (saved at any world size) into this run's modules and optimizer, resharded as they are."""
    read_metadata(Path(folder) / METADATA_FILE)  # refused here with one line, before DCP's planning wraps errors
    if optimizer is None:
        state: dict[str, Any] = {"model": get_model_state_dict(container)}
    else:
        model_sd, optim_sd = get_state_dict(container, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(folder), planner=SafeLoadPlanner(Path(folder)))
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as err:  # CheckpointException (a BaseException) gathers every rank's
        inner = _first_failure(err)
        if isinstance(inner, CheckpointError):
            raise inner from None
        raise CheckpointError(f"cannot resume: the shards in {folder} do not match this run's model or optimizer "
                              f"({type(inner).__name__}: {_first_line(inner)})") from None
    set_state_dict(container, optimizer if optimizer is not None else [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optim", {}))


def _first_failure(err: BaseException) -> BaseException:
    """The first rank's exception inside DCP's CheckpointException (failures: rank -> (exception, traceback))."""
    for failure in (getattr(err, "failures", None) or {}).values():
        return failure[0] if isinstance(failure, tuple) else failure
    return err


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:200]


def export_pretrained(folder: Path, policy: nn.Module, tokenizer: Any, ctx: DistContext) -> None:
    """The full policy (adapters only with LoRA) as a from_pretrained directory, gathered from the shards one
    tensor at a time into rank 0's CPU memory (`full_state_dict=True, cpu_offload=True`); rank 0 writes.
    Collective: every rank calls it."""
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ctx.is_main:
        # PeftModel.save_pretrained keeps the adapter entries of a full state dict; a plain model writes it all
        policy.save_pretrained(folder, state_dict=full)
        tokenizer.save_pretrained(folder)
    del full


def global_state_digest(state: dict[str, Any]) -> str:
    """A digest of the trainer state entries that must be the same on every rank (they are stored once)."""
    buf = io.BytesIO()
    torch.save({k: state[k] for k in ("step", "samples_seen", "sampler", "update_generator") if k in state}, buf)
    return hashlib.sha256(buf.getvalue()).hexdigest()


def check_global_state(state: dict[str, Any], ctx: DistContext) -> None:
    """Refuse to save a state whose 'global' entries differ between ranks: stored once (rank 0's), a resume at
    another world size would silently continue from the wrong data cursor."""
    if not ctx.enabled:
        return
    digests: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(digests, global_state_digest(state))
    if len(set(digests)) > 1:
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        raise CheckpointError(f"cannot checkpoint: the data cursor / step / minibatch generator of rank(s) {bad} "
                              "differ from rank 0's; they must be global (the same on every rank) to be stored once")


def describe(ctx: DistContext, optimizer: bool) -> dict[str, Any]:
    """The trainer.pt entry that marks a sharded checkpoint (plain data)."""
    return {"world_size": ctx.world_size, "optimizer": optimizer, "dir": SHARDS_DIR, "format": "torch.distributed.checkpoint"}


def save_sharded_checkpoint(run_dir: Path, step: int, models: Any, tokenizer: Any,
                            optimizer: torch.optim.Optimizer | None, trainer_state: dict[str, Any],
                            config: dict[str, Any], keep_last: int, ctx: DistContext) -> Path:
    """align.checkpoint.save_checkpoint for N ranks (collective): the same atomic protocol, rank 0 owning the
    folder, the rename and `latest`; every rank writes (and fsyncs) its own shard file before rank 0 renames."""
    from align import checkpoint as ckpt_io

    check_global_state(trainer_state, ctx)
    if ctx.is_main:
        ckpt_io.begin_checkpoint(run_dir, step)
    ctx.barrier()  # the empty folder exists before anyone writes into it
    tmp = Path(run_dir) / "checkpoints" / f".tmp-step-{step:06d}"
    container = model_container(models.policy, models.value_head, models.critic)
    save_shards(tmp / SHARDS_DIR, container, optimizer)
    export_pretrained(tmp, models.policy, tokenizer, ctx)
    final = tmp.parent / f"step-{step:06d}"
    if ctx.is_main:
        state = {k: v for k, v in trainer_state.items() if k not in ("optimizer", "value_head", "critic")}
        state["sharded"] = describe(ctx, optimizer is not None)
        final = ckpt_io.publish_checkpoint(tmp, step, state, config, keep_last)
    ctx.barrier()  # nobody returns (or starts the next step's save) before the checkpoint is in place
    return final


def load_sharded_checkpoint(ckpt: Path, models: Any, optimizer: torch.optim.Optimizer | None) -> None:
    """The model / value head / critic / optimizer state of a sharded checkpoint, at this run's world size."""
    load_shards(Path(ckpt) / SHARDS_DIR, model_container(models.policy, models.value_head, models.critic), optimizer)


def load_into_run(ckpt: Path, state: dict[str, Any], models: Any,
                  optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], bool]:
    """Models and optimizer of a sharded checkpoint, or of a one-process one loaded into this run's (sharded)
    ranks. Returns the trainer state without the entries consumed here, and whether the optimizer was restored."""
    sharded = state.get("sharded")
    rest = {k: v for k, v in state.items() if k not in ("optimizer", "value_head", "critic")}
    if sharded is not None:
        load_sharded_checkpoint(ckpt, models, optimizer if sharded["optimizer"] else None)
        return rest, bool(sharded["optimizer"])
    load_full_checkpoint(ckpt, state, models, optimizer)
    return rest, "optimizer" in state


def load_full_checkpoint(ckpt: Path, state: dict[str, Any], models: Any, optimizer: torch.optim.Optimizer) -> None:
    """A one-process checkpoint (full safetensors, trainer.pt's value head / critic / optimizer) into this run's
    modules, each rank keeping its shard (`set_state_dict(full_state_dict=True)`). The optimizer state of
    `torch.optim.Optimizer.state_dict()` numbers parameters in param-group order, which `_make_optimizer` builds
    the same way at any world size, so the numbers map to this run's parameter names."""
    from safetensors.torch import load_file

    from align import checkpoint as ckpt_io

    if models.lora:
        raise CheckpointError(f"cannot resume {ckpt} at several ranks: it was written by a one-process LoRA run; "
                              "resume it in one process, or start a new run with model.path set to it")
    folder = ckpt_io.model_dir(ckpt)
    container = model_container(models.policy, models.value_head, models.critic)
    full: dict[str, torch.Tensor] = {}
    try:
        for file in sorted(folder.glob("*.safetensors")):
            full.update({f"policy.{k}": v for k, v in load_file(str(file)).items()})
    except Exception as err:
        raise CheckpointError(f"cannot resume: policy weights in {folder} are corrupt ({_first_line(err)})") from None
    for part in ("value_head", "critic"):
        if part in state:
            full.update({f"{part}.{k}": v for k, v in state[part].items()})
    expected = set(get_model_state_dict(container))
    tied = getattr(models.policy.config, "tie_word_embeddings", False)
    missing = {k for k in expected - set(full) if not (tied and "lm_head" in k)}
    if missing or set(full) - expected:
        raise CheckpointError(f"cannot resume: {ckpt} does not match the model (missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(set(full) - expected)[:3]})")
    optim_sd: dict[str, Any] = {}
    if "optimizer" in state:
        names = {id(p): n for n, p in container.named_parameters()}
        order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        saved = state["optimizer"]
        optim_sd = {"state": {order[i]: moments for i, moments in saved["state"].items()},
                    "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_state_dict(container, optimizer, model_state_dict=full, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True, strict=False))


__all__ = ["SHARDS_DIR", "SafeFileSystemReader", "check_global_state", "describe", "export_pretrained",
           "load_full_checkpoint", "load_into_run", "load_sharded_checkpoint", "load_shards", "model_container", "read_metadata",
           "save_sharded_checkpoint", "save_shards"]
