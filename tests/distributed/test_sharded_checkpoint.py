"""Sharded checkpoints (align.distributed.checkpoint): FSDP2 over 2 gloo ranks saved with DCP, loaded back at 2
ranks and in 1 process, the gathered from_pretrained export, and the restricted unpickler of DCP's metadata."""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from _dcp_worker import IDS, one_step
from _launch import launch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict

from align import checkpoint as ckpt_io
from align.config import ModelConfig
from align.distributed import checkpoint as shards
from align.errors import CheckpointError
from align.models import load_models

WORKER = str(Path(__file__).with_name("_dcp_worker.py"))


@pytest.fixture(scope="module")
def sharded_run(tiny_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    launch([WORKER, str(tiny_model_path), str(out)], world_size=2, timeout_s=240)
    result = torch.load(out / "rank0.pt", weights_only=True)
    return result, Path(result["checkpoint"]), out


def assert_same_state(got: dict, want: dict) -> None:
    """Every parameter and every optimizer moment / step count equal (float32, bit for bit)."""
    assert set(got["model"]) == set(want["model"]) and len(want["model"]) == 43  # 21 policy + 22 critic tensors
    for name, value in want["model"].items():
        assert value.dtype == torch.float32 and torch.equal(got["model"][name], value), name
    assert set(got["optim"]["state"]) == set(want["optim"]["state"])
    for name, moments in want["optim"]["state"].items():
        assert set(moments) == {"step", "exp_avg", "exp_avg_sq"}
        for key, value in moments.items():
            assert torch.equal(torch.as_tensor(got["optim"]["state"][name][key]), torch.as_tensor(value)), (name, key)
    assert [g["lr"] for g in got["optim"]["param_groups"]] == [1e-2, 3e-2]


@pytest.mark.timeout(300)
def test_a_checkpoint_saved_at_two_ranks_loads_at_two_ranks(sharded_run):
    result, _, _ = sharded_run
    assert_same_state(result["loaded_at_2"], result["reference"])
    before = result["before"]  # the fresh models before the load: every tensor differed, so the load did it all
    assert all(not torch.equal(before["model"][k], v) for k, v in result["reference"]["model"].items()
               if k.startswith("policy."))
    assert all(not torch.equal(before["optim"]["state"][k]["exp_avg"], v["exp_avg"])
               for k, v in result["reference"]["optim"]["state"].items())


def one_process_models(model_dir, noise_seed=None):
    torch.manual_seed(0)  # the critic's value head starts from the same random init as in the ranks
    models = load_models(ModelConfig(path=str(model_dir)), torch.device("cpu"), need_reference=False, critic="separate")
    if noise_seed is not None:
        g = torch.Generator().manual_seed(noise_seed)
        with torch.no_grad():
            for p in models.policy.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    optimizer = torch.optim.AdamW([{"params": models.trainable_parameters(), "lr": 1e-2},
                                   {"params": models.critic_parameters(), "lr": 3e-2}], lr=1e-2, weight_decay=0.01)
    return models, optimizer


def full_state(models, optimizer) -> dict:
    model_sd, optim_sd = get_state_dict(shards.model_container(models.policy, None, models.critic), optimizer)
    return {"model": model_sd, "optim": optim_sd}


@pytest.mark.timeout(300)
def test_a_checkpoint_saved_at_two_ranks_loads_in_one_process(sharded_run, tiny_model_path):
    result, ckpt, _ = sharded_run
    models, optimizer = one_process_models(tiny_model_path, noise_seed=7)
    shards.load_sharded_checkpoint(ckpt, models, optimizer)
    assert_same_state(full_state(models, optimizer), result["reference"])


@pytest.mark.timeout(300)
def test_the_saved_state_is_the_two_rank_step_one_process_reproduces(sharded_run, tiny_model_path):
    """An independent reference for what was saved: the same AdamW step taken by one unsharded process
    (FSDP2 averages the two ranks' identical gradients, so the step is the same to rounding)."""
    result, _, _ = sharded_run
    models, optimizer = one_process_models(tiny_model_path)
    one_step(models, optimizer)
    want = full_state(models, optimizer)
    for name, value in result["reference"]["model"].items():
        torch.testing.assert_close(value, want["model"][name], atol=1e-6, rtol=0, msg=name)
    for name, moments in result["reference"]["optim"]["state"].items():
        torch.testing.assert_close(moments["exp_avg_sq"], want["optim"]["state"][name]["exp_avg_sq"], atol=1e-9, rtol=1e-5)


@pytest.mark.timeout(300)
def test_the_export_loads_with_from_pretrained_and_gives_the_trainers_logits(sharded_run, tiny_model_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    result, ckpt, out = sharded_run
    exported = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=IDS).logits, result["logits"], atol=1e-6, rtol=1e-6)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()(input_ids=IDS).logits
        assert (base - result["logits"]).abs().max() > 1e-3  # the step changed the model, so the match means it
        adapted = AutoPeftModelForCausalLM.from_pretrained(str(out / "lora-export")).eval()
        torch.testing.assert_close(adapted(input_ids=IDS).logits, result["lora_logits"], atol=1e-6, rtol=1e-6)
        assert (base - result["lora_logits"]).abs().max() > 1e-4
    assert not (out / "lora-export" / "model.safetensors").exists()  # adapters only


@pytest.mark.timeout(300)
def test_the_sharded_checkpoint_is_published_atomically(sharded_run):
    _, ckpt, _ = sharded_run
    root = ckpt.parent
    assert (root / "latest").read_text() == ckpt.name == "step-000001"
    assert not list(root.glob(".tmp-*")) and not list(root.glob(".old-*"))
    assert sorted(p.name for p in (ckpt / "shards").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert ckpt_io.find_checkpoint(root.parent) == ckpt
    state = ckpt_io.load_trainer_state(ckpt)  # weights_only: the trainer state stays plain data
    assert state["sharded"]["world_size"] == 2 and state["sharded"]["optimizer"] is True
    assert state["sampler"] == {"epoch": 0, "index": 2} and state["step"] == 1
    assert "optimizer" not in state and "critic" not in state  # those are in the shards, stored once


@pytest.mark.timeout(300)
def test_ranks_that_disagree_on_the_stored_once_state_cannot_save(sharded_run):
    result, _, _ = sharded_run
    assert "rank(s) [1] differ from rank 0's" in result["refused"] and "\n" not in result["refused"]


# ------------------------------------------------------------------------------------ the metadata pickle

class _RunsCode:
    """Unpickling this calls exec: what a crafted .metadata would do to a plain `pickle.load`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def small_checkpoint(folder: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    dcp.save({"model": module.state_dict()}, checkpoint_id=folder)
    return module


def test_genuine_metadata_loads_through_the_restricted_reader(tmp_path):
    saved = small_checkpoint(tmp_path / "ckpt")
    target = torch.nn.Linear(3, 2)
    state = {"model": target.state_dict()}
    dcp.load(state, storage_reader=shards.SafeFileSystemReader(tmp_path / "ckpt"))
    target.load_state_dict(state["model"])
    assert torch.equal(target.weight, saved.weight) and torch.equal(target.bias, saved.bias)
    metadata = shards.read_metadata(tmp_path / "ckpt" / ".metadata")
    assert set(metadata.state_dict_metadata) == {"model.weight", "model.bias"}


def test_crafted_metadata_is_refused_before_it_runs(tmp_path):
    small_checkpoint(tmp_path / "ckpt")
    marker = tmp_path / "code-ran"
    payload = pickle.dumps(_RunsCode(marker))
    pickle.load(io.BytesIO(payload))  # the payload is real: plain pickle runs it
    assert marker.read_text() == "ran"
    marker.unlink()
    metadata_file = tmp_path / "ckpt" / ".metadata"
    metadata_file.write_bytes(payload)

    with pytest.raises(CheckpointError) as err:
        shards.read_metadata(metadata_file)
    assert not marker.exists(), "the crafted .metadata ran its code"
    message = str(err.value)
    assert "\n" not in message and str(metadata_file) in message and "builtins.exec" in message

    target = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match="builtins.exec"):  # the load path refuses it too, with one line
        shards.load_shards(tmp_path / "ckpt", target, None)
    assert not marker.exists(), "the crafted .metadata ran its code"
    with pytest.raises(CheckpointException, match="builtins.exec"):  # and the reader when DCP drives it directly
        dcp.load({"model": target.state_dict()}, storage_reader=shards.SafeFileSystemReader(tmp_path / "ckpt"))
    assert not marker.exists(), "the crafted .metadata ran its code"


def test_corrupt_metadata_is_a_one_line_error(tmp_path):
    small_checkpoint(tmp_path / "ckpt")
    metadata_file = tmp_path / "ckpt" / ".metadata"
    metadata_file.write_bytes(metadata_file.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="corrupt") as err:
        shards.read_metadata(metadata_file)
    assert "\n" not in str(err.value) and str(metadata_file) in str(err.value)


def test_a_crafted_non_tensor_entry_in_a_shard_file_is_refused_before_it_runs(tmp_path):
    """DCP stores non-tensor values (the optimizer's lr, betas, ...) as torch.save blobs in the shard files and
    its default planner reads them with weights_only=False; a crafted blob is refused, a genuine one loads."""
    import dataclasses

    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.125)
    module(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    folder = tmp_path / "shards"
    shards.save_shards(folder, module, optimizer)

    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.5)
    shards.load_shards(folder, fresh, fresh_opt)  # genuine: loads, hyper-parameters included
    assert fresh_opt.param_groups[0]["lr"] == 0.125 and torch.equal(fresh.weight, module.weight)

    marker = tmp_path / "code-ran"
    blob = io.BytesIO()
    torch.save(_RunsCode(marker), blob)
    metadata = shards.read_metadata(folder / ".metadata")
    index = next(i for i in metadata.storage_data if i.fqn == "optim.param_groups.0.lr")
    info = metadata.storage_data[index]
    shard_file = folder / info.relative_path
    offset = shard_file.stat().st_size
    with shard_file.open("ab") as f:  # the crafted blob appended, the entry pointed at it
        f.write(blob.getvalue())
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(blob.getvalue()))
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))

    with pytest.raises(CheckpointError) as err:
        shards.load_shards(folder, fresh, torch.optim.AdamW(fresh.parameters(), lr=0.5))
    assert not marker.exists(), "the crafted shard entry ran its code"
    message = str(err.value)
    assert "\n" not in message and "optim.param_groups.0.lr" in message and "exec" in message
    assert str(folder) in message
