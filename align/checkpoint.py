"""Atomic checkpoints and exact resume.

Layout: RUN_DIR/checkpoints/step-000004/{policy/, trainer.pt, config.json} and RUN_DIR/checkpoints/latest
(a text file naming the newest complete checkpoint). A checkpoint is written to a temporary directory and
renamed into place, and `latest` is replaced atomically after that, so a crash never leaves a half-written
checkpoint that resume would pick up. Resume refuses a missing or corrupt checkpoint (never a fresh start).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from align.errors import CheckpointError

TRAINER_FILE = "trainer.pt"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, policy, tokenizer, trainer_state: dict[str, Any],
                    config: dict[str, Any], keep_last: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    policy.save_pretrained(tmp / "policy")  # with LoRA: the adapters only
    tokenizer.save_pretrained(tmp / "policy")
    torch.save({**trainer_state, "step": step, "rng": rng_state()}, tmp / TRAINER_FILE)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    stale = root / f".old-step-{step:06d}"
    if final.exists():  # re-saving a step: keep the old copy until the new one is in place and named
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
    os.replace(tmp, final)
    _atomic_write_text(root / "latest", final.name)
    shutil.rmtree(stale, ignore_errors=True)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep_last]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a run directory (via `checkpoints/latest`) or a checkpoint path."""
    path = Path(path)
    if (path / TRAINER_FILE).is_file():
        return path
    latest = path / "checkpoints" / "latest"
    if not path.exists():
        raise CheckpointError(f"cannot resume: {path} does not exist")
    if not latest.is_file():
        raise CheckpointError(f"cannot resume: {path} has no checkpoints/latest; give a run directory with a "
                              "checkpoint or a checkpoint directory (step-NNNNNN)")
    ckpt = path / "checkpoints" / latest.read_text().strip()
    if not (ckpt / TRAINER_FILE).is_file():
        raise CheckpointError(f"cannot resume: {latest} names {ckpt.name}, which is missing or incomplete")
    return ckpt


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    try:
        return torch.load(ckpt / TRAINER_FILE, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated or overwritten file
        raise CheckpointError(f"cannot resume: {ckpt / TRAINER_FILE} is corrupt ({type(err).__name__}: {err})") from None


def load_policy_weights(policy, ckpt: Path, lora: bool) -> None:
    """Load the checkpoint's policy (or adapter) weights into the already-built `policy`."""
    from safetensors.torch import load_file

    folder = ckpt / "policy"
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
