"""Ray trainer actors (`align.distributed.ray_trainers`): the launcher's ranks join one gloo group with torchrun's
variables, threads pinned; a killed or failing rank ends the run with a one-line error naming it, in bounded
time. (That 2 trainer actors reproduce the torchrun 2-rank run is in test_ray_trainers_repro.py.)"""
from __future__ import annotations

import os
import signal
import sys
import time

import pytest

ray = pytest.importorskip("ray")
from _ray_local import local_ray  # noqa: E402
from ray import cloudpickle  # noqa: E402

from align.distributed.ray_trainers import TrainerRankError, launch, rank_envs  # noqa: E402
from align.errors import ConfigError, UserError  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the SPMD functions below run in the actors


def test_rank_envs_follow_torchrun():
    """3 ranks on 2 nodes: ranks 0 and 2 share node A (local ranks 0, 1), rank 1 is alone on node B; the master
    is rank 0's node and port; on GPUs a node's ranks see that node's trainer GPUs in local-rank order."""
    nodes = [{"ip": "10.0.0.1", "gpus": ["3"], "port": 2901}, {"ip": "10.0.0.2", "gpus": ["0"], "port": 1},
             {"ip": "10.0.0.1", "gpus": ["5"], "port": 2}]
    envs = rank_envs(nodes)
    assert [e["RANK"] for e in envs] == ["0", "1", "2"]
    assert {e["WORLD_SIZE"] for e in envs} == {"3"}
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "0", "1"]
    assert [e["LOCAL_WORLD_SIZE"] for e in envs] == ["2", "1", "2"]
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs} == {("10.0.0.1", "2901")}
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["3,5", "0", "3,5"]
    # cuda:LOCAL_RANK is each rank's own GPU
    for e, n in zip(envs, nodes):
        assert e["CUDA_VISIBLE_DEVICES"].split(",")[int(e["LOCAL_RANK"])] == n["gpus"][0]
    assert "CUDA_VISIBLE_DEVICES" not in rank_envs([{"ip": "h", "gpus": [], "port": 5}])[0]


@pytest.fixture(scope="module")
def ray_local():
    yield from local_ray(num_cpus=4)


def spmd_probe(fault: str):
    """Join the group from torchrun's variables, all-reduce (rank + 1), report what the rank saw; `fault`
    makes rank 1 kill itself (SIGKILL) or raise after joining, while rank 0 waits in a collective, or hang
    while rank 0 returns."""
    import torch
    import torch.distributed as dist

    from align.distributed import init_from_env

    ctx = init_from_env(timeout_s=60, backend="gloo")
    if fault == "kill" and ctx.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "raise" and ctx.rank == 1:
        raise ValueError("injected rank failure")
    if fault == "straggle":  # rank 0 finishes; rank 1 is stuck outside any collective (no group timeout fires)
        if ctx.rank == 1:
            time.sleep(120)
        return {}
    t = torch.tensor([float(ctx.rank + 1)])
    ctx.all_reduce_sum(t)
    out = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    out |= {"sum": t.item(), "threads": torch.get_num_threads(), "ctx": (ctx.rank, ctx.world_size, ctx.local_rank),
            "dist_rank": dist.get_rank(), "pid": os.getpid()}
    dist.destroy_process_group()
    return out


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_launcher_ranks_join_one_group_and_faults_end_it(ray_local):
    got = launch(spmd_probe, ("none",), num_workers=2, num_cpus=1, num_gpus=0)
    assert [g["RANK"] for g in got] == ["0", "1"] and [g["dist_rank"] for g in got] == [0, 1]
    assert {g["WORLD_SIZE"] for g in got} == {"2"} and [g["ctx"] for g in got] == [(0, 2, 0), (1, 2, 1)]
    assert [g["LOCAL_RANK"] for g in got] == ["0", "1"]  # one node
    assert len({(g["MASTER_ADDR"], g["MASTER_PORT"]) for g in got}) == 1
    assert [g["sum"] for g in got] == [3.0, 3.0]  # 1 + 2 over the group
    assert [g["threads"] for g in got] == [1, 1]  # num_cpus 1 -> one torch thread per actor
    assert got[0]["pid"] != got[1]["pid"] != os.getpid()

    # rank 1 is killed while rank 0 waits in the all-reduce: the run ends naming rank 1, well before the
    # 60 s group timeout
    t0 = time.monotonic()
    with pytest.raises(TrainerRankError) as info:
        launch(spmd_probe, ("kill",), num_workers=2, num_cpus=1, num_gpus=0)
    assert time.monotonic() - t0 < 45
    message = str(info.value)
    assert message.startswith("Ray trainer rank 1 died") and "\n" not in message, message

    with pytest.raises(TrainerRankError) as info:
        launch(spmd_probe, ("raise",), num_workers=2, num_cpus=1, num_gpus=0)
    message = str(info.value)
    assert message == "Ray trainer rank 1 failed: ValueError: injected rank failure", message

    t0 = time.monotonic()
    with pytest.raises(TrainerRankError) as info:
        launch(spmd_probe, ("straggle",), num_workers=2, num_cpus=1, num_gpus=0, straggler_timeout_s=3)
    assert time.monotonic() - t0 < 45
    assert str(info.value) == "rank 0 finished, the others did not within 3 s (still running: ranks [1])"
    deadline = time.monotonic() + 20  # every launch frees its actors and placement group (asynchronously)
    while ray.available_resources().get("CPU", 0) < 4:
        assert time.monotonic() < deadline, f"trainer actors left holding {ray.available_resources()}"
        time.sleep(0.5)


def test_trainer_workers_config(tiny_model_path, arithmetic_data, tmp_path):
    import align
    from align.config import config_from_dict

    base = {"algorithm": "grpo", "model": {"path": str(tiny_model_path)}, "data": {"path": str(arithmetic_data["prompts"])},
            "reward": {"functions": [_Zero()]},
            "logging": {"run_dir": str(tmp_path / "r"), "progress": False}}
    with pytest.raises(ConfigError, match="num_trainer_workers = 2: > 1 needs cluster.backend: ray"):
        config_from_dict(base | {"cluster": {"num_trainer_workers": 2}})
    with pytest.raises(ConfigError, match="trainer_num_cpus"):
        config_from_dict(base | {"cluster": {"backend": "ray", "trainer_num_cpus": 0}})
    # a Trainer built directly cannot start the actors: a one-line error naming what does
    with pytest.raises(UserError, match="started by align.train"):
        align.Trainer(base | {"cluster": {"backend": "ray", "num_trainer_workers": 2}})


class _Zero:
    __name__ = "zero"

    def __call__(self, prompts, completions, **kwargs):
        return [0.0] * len(completions)


def nccl_probe():
    import torch

    from align.distributed import init_from_env

    ctx = init_from_env(timeout_s=60, backend="nccl")
    t = torch.tensor([float(ctx.rank + 1)], device="cuda")
    ctx.all_reduce_sum(t)
    return {"sum": t.item(), "device": torch.cuda.current_device(), "local_rank": ctx.local_rank,
            "uuid": str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)}


@pytest.mark.gpu
@pytest.mark.ray
@pytest.mark.timeout(240)
def test_trainer_actors_one_gpu_each(ray_local):
    """2 GPUs: each trainer actor runs on its own GPU (cuda:LOCAL_RANK) and NCCL all-reduces across them."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("two trainer actors with a GPU each need two GPUs")
    ray.shutdown()
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    got = launch(nccl_probe, (), num_workers=2, num_cpus=1, num_gpus=None)  # None: 1 GPU each on a GPU cluster
    assert [g["sum"] for g in got] == [3.0, 3.0]
    assert [g["device"] for g in got] == [g["local_rank"] for g in got] == [0, 1]
    assert got[0]["uuid"] != got[1]["uuid"]
