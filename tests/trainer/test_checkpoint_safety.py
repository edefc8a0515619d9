"""Safe checkpoints: trainer state is tensors and plain data (loaded with weights_only=True, so a crafted file
cannot run code), files and directories are fsynced before the atomic rename, `latest` stays in its run."""
from __future__ import annotations

import builtins
import os
from pathlib import Path

import pytest
import torch

import align
from align import checkpoint as ckpt_io
from align.errors import CheckpointError, UserError
from align.testing import tiny_run_config


class Half:
    __name__ = "half"

    def __call__(self, prompts, completions, **kwargs):
        return [0.25 + 0.5 * (i % 2) for i in range(len(completions))]


def config(algorithm, model, data, run_dir, steps=1, **sections):
    base = {"train": {"steps": steps}, "checkpoint": {"save_final": True}}
    return tiny_run_config(algorithm, model, data, run_dir, Half(), base, **sections)


class Payload:
    """Unpickling this object runs code (writes `marker`): what a planted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.mark.parametrize("algorithm, sections", [
    ("grpo", {"algo": {"group_size": 2}}),
    ("ppo", {"reward": {"curiosity": {"eta": 0.5, "top_k": 1}, "normalize": "running"}}),
])
def test_trainer_state_is_weights_only_loadable(algorithm, sections, tiny_model_path, arithmetic_data, tmp_path):
    result = align.train(config(algorithm, tiny_model_path, arithmetic_data["prompts"], tmp_path / "run", **sections))
    state = torch.load(result.checkpoint / "trainer.pt", map_location="cpu", weights_only=True)
    assert state["algorithm"] == algorithm and state["step"] == 1
    if algorithm == "ppo":
        assert "curiosity" in state and "reward" in state


def test_pickled_code_in_trainer_state_is_refused_and_never_runs(tiny_model_path, arithmetic_data, tmp_path):
    cfg = config("grpo", tiny_model_path, arithmetic_data["prompts"], tmp_path / "run", algo={"group_size": 2})
    ckpt = align.train(cfg).checkpoint
    state = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)  # plain data since 0.2.0
    marker = tmp_path / "payload-ran"
    state["payload"] = Payload(marker)  # an otherwise valid trainer state with one extra, hostile entry
    torch.save(state, ckpt / "trainer.pt")
    cfg["train"]["steps"] = 2
    try:
        align.train(cfg, resume_from=tmp_path / "run")
        err = None
    except CheckpointError as caught:
        err = caught
    assert not marker.exists(), "loading the checkpoint ran the code pickled into it"
    assert err is not None, "a trainer.pt holding a pickled callable was resumed from"
    message = str(err)
    assert "\n" not in message and "trainer.pt" in message and "exec" in message and "weights_only" in message
    assert isinstance(err, UserError)


def test_corrupt_trainer_state_is_still_called_corrupt(tmp_path):
    ckpt = tmp_path / "step-000001"
    ckpt.mkdir()
    (ckpt / "trainer.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt") as err:
        ckpt_io.load_trainer_state(ckpt)
    assert "\n" not in str(err.value)
    torch.save([1, 2, 3], ckpt / "trainer.pt")  # plain data, but not a trainer state
    with pytest.raises(CheckpointError, match="not a trainer state"):
        ckpt_io.load_trainer_state(ckpt)


def _fake_run(root: Path, steps=(1,)) -> Path:
    for s in steps:
        d = root / "checkpoints" / f"step-{s:06d}"
        d.mkdir(parents=True)
        (d / "trainer.pt").write_bytes(b"x")
    (root / "checkpoints" / "latest").write_text(f"step-{steps[-1]:06d}")
    return root


def test_latest_is_confined_to_its_run_dir(tmp_path):
    mine = _fake_run(tmp_path / "mine")
    other = _fake_run(tmp_path / "other")
    assert ckpt_io.find_checkpoint(mine) == mine / "checkpoints" / "step-000001"  # the normal case still works
    latest = mine / "checkpoints" / "latest"
    target = other / "checkpoints" / "step-000001"
    escapes = {
        "relative": "../../other/checkpoints/step-000001",
        "absolute": str(target),
    }
    for kind, text in escapes.items():
        latest.write_text(text)
        with pytest.raises(CheckpointError, match="outside") as err:
            ckpt_io.find_checkpoint(mine)
        assert "\n" not in str(err.value), kind
    # a checkpoint directory that is a symlink to another run's checkpoint
    (mine / "checkpoints" / "step-000009").symlink_to(target, target_is_directory=True)
    latest.write_text("step-000009")
    with pytest.raises(CheckpointError, match="outside"):
        ckpt_io.find_checkpoint(mine)
    # a trainer.pt inside the run that is a symlink to a file elsewhere
    (mine / "checkpoints" / "step-000002").mkdir()
    (mine / "checkpoints" / "step-000002" / "trainer.pt").symlink_to(target / "trainer.pt")
    latest.write_text("step-000002")
    with pytest.raises(CheckpointError, match="outside"):
        ckpt_io.find_checkpoint(mine)
    # `latest` itself a symlink to another run's pointer
    latest.unlink()
    latest.symlink_to(other / "checkpoints" / "latest")
    with pytest.raises(CheckpointError, match="symlink"):
        ckpt_io.find_checkpoint(mine)


def test_checkpoint_files_and_dirs_are_fsynced_before_the_rename(tiny_model_path, arithmetic_data, tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        events.append(("replace", f"{os.fspath(src)} -> {os.fspath(dst)}"))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    run = (tmp_path / "run").resolve()
    final = align.train(config("grpo", tiny_model_path, arithmetic_data["prompts"], run, algo={"group_size": 2})).checkpoint
    root = str(run / "checkpoints")
    tmp = str(run / "checkpoints" / ".tmp-step-000001")
    synced = [p for kind, p in events if kind == "fsync"]
    assert synced, "os.fsync was never called while saving a checkpoint"
    rename = events.index(("replace", f"{tmp} -> {final}"))
    before = {p for kind, p in events[:rename] if kind == "fsync"}
    after = {p for kind, p in events[rename + 1:] if kind == "fsync"}
    files = [p for p in final.rglob("*")]
    for p in files:  # every file and folder of the checkpoint, under its temporary name, before the rename
        assert str(p).replace(str(final), tmp) in before, p
    assert tmp in before  # the checkpoint directory itself
    assert root in after  # the directory holding the renamed entry, after the rename
    latest = events.index(("replace", f"{root}/latest.tmp -> {root}/latest"))
    assert ("fsync", f"{root}/latest.tmp") in events[:latest]
    assert ("fsync", root) in events[latest + 1:]
