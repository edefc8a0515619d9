"""Atomic checkpoints and exact resume.

Layout: RUN_DIR/checkpoints/step-000004/ is a Hugging Face model directory (config.json + model.safetensors +
tokenizer files; with LoRA adapter_config.json + adapter_model.safetensors), so `from_pretrained(step_dir)`
loads it directly, with the trainer state beside the model: trainer.pt and align_config.json (the run config,
secrets redacted). RUN_DIR/checkpoints/latest is a text file naming the newest complete checkpoint.
Checkpoints of earlier versions kept the model under policy/; resume still reads them.

A checkpoint is written to a temporary directory, every file and folder of it fsynced, renamed into place and
the parent directory fsynced; `latest` is replaced the same way after that, so neither a crash nor a power loss
leaves a half-written checkpoint that resume would pick up. Resume refuses a missing or corrupt checkpoint (never a fresh start).

Safe loads: `trainer.pt` holds tensors and plain data only (dicts, lists, tuples, str, int, float, bool, None;
RNG states are converted to these when saving) and is read with `torch.load(weights_only=True)`, so a crafted
file cannot run code; `latest` must name a checkpoint inside its own `checkpoints/` folder (no `..`, no
absolute path, no symlink out of it). A checkpoint that fails a check is refused with a one-line
CheckpointError that names the fix.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from align.errors import CheckpointError, UserError
from align.redact import redact_secrets

TRAINER_FILE = "trainer.pt"
RUN_CONFIG_FILE = "align_config.json"  # not config.json: that name is the model's (from_pretrained reads it)
# what a run writes into its run directory (the logging sinks of logging.report_to included)
RUN_FILES = ("metrics.jsonl", "completions.jsonl", "checkpoints", "tb", "wandb", "wandb_run_id")


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and plain data (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": list(internal), "gauss_next": gauss},
             "numpy": {"bit_generator": str(name), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    np.random.set_state((npy["bit_generator"], npy["key"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's contents (a directory: its entries) to stable storage."""
    if os.name == "nt" and path.is_dir():  # Windows cannot open a directory for fsync
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(top: Path) -> None:
    """fsync every file and folder under `top` (children first), then `top` itself."""
    for folder, dirs, files in os.walk(top, topdown=False):
        for name in files:
            _fsync(Path(folder) / name)
        for name in dirs:
            _fsync(Path(folder) / name)
    _fsync(top)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def save_checkpoint(run_dir: Path, step: int, policy, tokenizer, trainer_state: dict[str, Any],
                    config: dict[str, Any], keep_last: int) -> Path:
    tmp = begin_checkpoint(run_dir, step)
    policy.save_pretrained(tmp)  # with LoRA: the adapters only (adapter_config.json names the base model)
    tokenizer.save_pretrained(tmp)
    return publish_checkpoint(tmp, step, trainer_state, config, keep_last)


def begin_checkpoint(run_dir: Path, step: int) -> Path:
    """An empty temporary folder for step `step`'s checkpoint (a leftover of an interrupted save removed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        _fsync(root.parent)
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def publish_checkpoint(tmp: Path, step: int, trainer_state: dict[str, Any], config: dict[str, Any],
                       keep_last: int) -> Path:
    """Add the trainer state and run config to `tmp` (the model is in it), fsync it all, then rename it into
    place and point `latest` at it: a crash at any point leaves the previous checkpoint the latest."""
    root = tmp.parent
    final = root / f"step-{step:06d}"
    torch.save({**trainer_state, "step": step, "rng": rng_state()}, tmp / TRAINER_FILE)
    (tmp / RUN_CONFIG_FILE).write_text(json.dumps(redact_secrets(config), indent=2, default=str))  # no tokens on disk
    _fsync_tree(tmp)  # contents on disk before the rename makes them the checkpoint
    stale = root / f".old-step-{step:06d}"
    if final.exists():  # re-saving a step: keep the old copy until the new one is in place and named
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
    os.replace(tmp, final)
    _fsync(root)  # the rename itself on disk before `latest` names it
    _atomic_write_text(root / "latest", final.name)
    shutil.rmtree(stale, ignore_errors=True)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep_last]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path`, all symlinks followed, lies inside `folder` (also resolved)."""
    return path.resolve().is_relative_to(folder.resolve())


def _confined(ckpt: Path, folder: Path, via: str = "") -> Path:
    """Refuse a checkpoint that is, or holds, a symlink resolving outside `folder`."""
    for p in (ckpt, *(sorted(ckpt.rglob("*")) if ckpt.is_dir() else ())):
        if (p.exists() or p.is_symlink()) and not _inside(p, folder):
            raise CheckpointError(f"cannot resume: {p}{via} resolves to {p.resolve()}, outside {folder}; a "
                                  "checkpoint must lie inside its own run directory (resume from that run instead)")
    return ckpt


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a run directory (via `checkpoints/latest`) or a checkpoint path.

    `latest` is confined to its run: it must name an entry of the same `checkpoints/` folder (no `..`, no
    absolute path), and neither that entry nor anything in it may be a symlink out of that folder.
    """
    path = Path(path)
    if (path / TRAINER_FILE).is_file():
        return _confined(path, path)
    root = path / "checkpoints"
    latest = root / "latest"
    if not path.exists():
        raise CheckpointError(f"cannot resume: {path} does not exist")
    if latest.is_symlink():
        raise CheckpointError(f"cannot resume: {latest} is a symlink (to {os.readlink(latest)}); it must be a file "
                              "naming a checkpoint of this run: write the step-NNNNNN name into it")
    if not latest.is_file():
        raise CheckpointError(f"cannot resume: {path} has no checkpoints/latest; give a run directory with a "
                              "checkpoint or a checkpoint directory (step-NNNNNN)")
    name = latest.read_text().strip()
    if not name or name != Path(name).name or name in (".", "..") or Path(name).is_absolute():
        raise CheckpointError(f"cannot resume: {latest} names {name!r}, outside {root}; it must name a checkpoint "
                              "of this run (step-NNNNNN); to resume another run, give that run's directory")
    ckpt = _confined(root / name, root, f" (named by {latest})")
    if not (ckpt / TRAINER_FILE).is_file():
        raise CheckpointError(f"cannot resume: {latest} names {ckpt.name}, which is missing or incomplete")
    return ckpt


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """trainer.pt through `torch.load(weights_only=True)`: tensors and plain data only, so loading runs no code."""
    file = ckpt / TRAINER_FILE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found:  # a callable or class in the pickle: never loaded, never run
            raise CheckpointError(
                f"cannot resume: {file} holds {found.group(1)}, which is not a tensor or plain data, so it was not "
                "loaded (weights_only=True refuses pickled code); resume only from checkpoints written by align "
                ">= 0.2.0, or start a new run with model.path set to this checkpoint's directory") from None
        raise CheckpointError(f"cannot resume: {file} is corrupt ({_first_line(err)})") from None
    except Exception as err:  # truncated or overwritten file
        raise CheckpointError(f"cannot resume: {file} is corrupt ({type(err).__name__}: {_first_line(err)})") from None
    if not isinstance(state, dict) or not {"step", "rng", "algorithm"} <= set(state):
        raise CheckpointError(f"cannot resume: {file} is not a trainer state written by align (no step / rng / "
                              "algorithm entries); give a checkpoint directory written by align train")
    return state


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = next((line for line in lines if "WeightsUnpickler error" not in line and "Weights only" not in line), "")
    return (text or (lines[0] if lines else type(err).__name__))[:200]


def model_dir(ckpt: Path) -> Path:
    """The folder holding a checkpoint's model: the checkpoint itself, or policy/ in one of an earlier version."""
    legacy = Path(ckpt) / "policy"  # the old layout's top-level config.json was the run config, not the model's
    return legacy if (legacy / "config.json").is_file() or (legacy / "adapter_config.json").is_file() else Path(ckpt)


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run over an old one (its metrics.jsonl would be emptied and its checkpoints left
    beside the new ones, `latest` naming whichever wrote last); `overwrite` removes what the old run wrote."""
    run_dir = Path(run_dir)
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if resume or not found:
        return
    if not overwrite:
        raise UserError(f"{run_dir} already holds a run ({', '.join(found)}); continue it with --resume {run_dir} "
                        "(checkpoint.resume_from) or replace it with --overwrite (checkpoint.overwrite: true)")
    for name in found:  # only what align writes: run_dir may be shared with the user's own files
        target = run_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()


def load_policy_weights(policy, ckpt: Path, lora: bool) -> None:
    """Load the checkpoint's policy (or adapter) weights into the already-built `policy`."""
    from safetensors.torch import load_file

    folder = model_dir(ckpt)
    if lora:
        from peft import set_peft_model_state_dict

        file = folder / "adapter_model.safetensors"
        if not file.is_file():
            raise CheckpointError(f"cannot resume: {file} is missing (was the run trained with LoRA?)")
        set_peft_model_state_dict(policy, load_file(str(file)))
        return
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"cannot resume: no policy weights in {folder}")
    state: dict[str, torch.Tensor] = {}
    try:
        for f in files:
            state.update(load_file(str(f)))
    except Exception as err:
        raise CheckpointError(f"cannot resume: policy weights in {folder} are corrupt ({err})") from None
    missing, unexpected = policy.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k and getattr(policy.config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"cannot resume: {folder} does not match the model (missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]})")
