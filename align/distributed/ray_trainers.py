"""Ray trainer actors: `cluster.backend: ray` with `cluster.num_trainer_workers: N > 1` runs N SPMD trainer
ranks as Ray actors in one placement group, driven by the process that called `align.train` / `align train` /
`align submit`'s job.

Each actor gets a bundle (`{CPU: trainer_num_cpus, GPU: trainer_num_gpus}`), pins torch to its CPU share, sets
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT exactly as torchrun would, and runs the same Trainer
a torchrun rank runs (`align.distributed.init_from_env` joins the group). Rollouts and rewards are colocated:
inside an actor the Trainer uses the local backend (its own engine on its rank's share of the prompts), so N
actors compute what `torchrun --nproc_per_node N` computes. Rank 0's `TrainResult` is returned to the driver.

Failures end the run, never hang it: an actor that dies (or a rank that raises) ends the run with a one-line
`TrainerRankError` naming the rank; the other actors are killed at once (they may be blocked in a collective).
A rank that stalls without dying makes the others' collectives time out after `cluster.trainer_timeout_s`, and
ranks still running that long after one rank finished end the run as well.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

from align.errors import AlignError, UserError

RANK_FLAG = "ALIGN_RAY_TRAINER_RANK"  # set inside a trainer actor: its Trainer is one SPMD rank
# after the first failure, wait this long for the others so that a dead actor (the cause) is named rather
# than a live rank whose collective failed because its peer died
_GRACE_S = 3.0


class TrainerRankError(AlignError, RuntimeError):
    """A Ray trainer rank died or failed; the run is over (the message names the rank)."""


def in_trainer_actor() -> bool:
    return os.environ.get(RANK_FLAG) == "1"


def rollouts_colocated(cfg) -> bool:
    """Whether this Trainer is a trainer actor's rank (rollouts and rewards run in it: the local backend).
    A Trainer built directly with num_trainer_workers > 1 outside a rank is refused: only `train()` starts the
    actors."""
    if in_trainer_actor():
        return True
    if cfg.cluster.num_trainer_workers > 1:
        raise UserError("cluster.num_trainer_workers > 1: the trainer actors are started by align.train(...) / "
                        "`align train`, not by Trainer(...); use those, or set cluster.num_trainer_workers: 1")
    return False


def wants_trainer_actors(cfg) -> bool:
    """`train()` should launch trainer actors: ray backend, N > 1, and not already inside a rank (torchrun's
    WORLD_SIZE or a trainer actor)."""
    cc = cfg.cluster
    if cc.backend != "ray" or cc.num_trainer_workers <= 1 or in_trainer_actor():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("cluster.num_trainer_workers > 1 under torchrun: torchrun already starts the ranks; "
                        "set cluster.num_trainer_workers: 1 (or run without torchrun)")
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


class TrainerActor:
    """One trainer rank's process. `num_threads`: torch's intra-op threads (threads x actors <= cores)."""

    def __init__(self, num_threads: int):
        import torch

        os.environ["OMP_NUM_THREADS"] = str(num_threads)
        torch.set_num_threads(num_threads)
        self.num_threads = num_threads

    def node(self) -> dict[str, Any]:
        import ray

        return {"ip": ray.util.get_node_ip_address(), "gpus": [str(g) for g in ray.get_gpu_ids()],
                "port": _free_port(), "pid": os.getpid()}

    def setup(self, env: dict[str, str]) -> dict[str, str]:
        os.environ.update(env)
        if env.get("CUDA_VISIBLE_DEVICES"):
            import torch

            # CUDA is not initialised yet in this process, so the widened device list applies: cuda:LOCAL_RANK
            # is this actor's own GPU, as under torchrun
            torch.cuda.set_device(int(env["LOCAL_RANK"]))
        return {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}

    def run(self, fn: Callable, args: tuple) -> Any:
        return fn(*args)


def rank_envs(nodes: list[dict[str, Any]]) -> list[dict[str, str]]:
    """torchrun's variables for each actor (index = rank) from what each reported (ip, gpus, port). LOCAL_RANK
    is the rank's position among the ranks on its node; on GPUs every rank of a node sees the node's trainer
    GPUs in local-rank order (CUDA_VISIBLE_DEVICES), so cuda:LOCAL_RANK is its own GPU."""
    world = len(nodes)
    by_node: dict[str, list[int]] = {}
    for r, n in enumerate(nodes):
        by_node.setdefault(n["ip"], []).append(r)
    envs = []
    for r, n in enumerate(nodes):
        peers = by_node[n["ip"]]
        env = {"RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(peers.index(r)),
               "LOCAL_WORLD_SIZE": str(len(peers)), "MASTER_ADDR": nodes[0]["ip"], "MASTER_PORT": str(nodes[0]["port"]),
               RANK_FLAG: "1"}
        if n["gpus"]:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(nodes[p]["gpus"][0] for p in peers)
        envs.append(env)
    return envs


def _one_line(err: BaseException) -> str:
    cause = getattr(err, "cause", None) or err
    lines = [x.strip() for x in str(cause).splitlines() if x.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"


def launch(fn: Callable, args: tuple = (), *, num_workers: int, num_cpus: float = 1.0, num_gpus: float | None = None,
           address: str = "", placement_timeout_s: float = 120.0, run_timeout_s: float | None = None,
           straggler_timeout_s: float | None = None) -> list[Any]:
    """Run `fn(*args)` on `num_workers` trainer actors (rank r = actor r), each with torchrun's variables set;
    returns the results in rank order. A rank that dies or raises ends the launch with a `TrainerRankError`
    naming it (the others are killed); `run_timeout_s` bounds the whole run (None: unbounded), and
    `straggler_timeout_s` how long the others may run on once one rank has finished."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    started = False
    if not ray.is_initialized():
        try:
            ray.init(address=address or None, log_to_driver=True)
        except ConnectionError as err:
            raise UserError(f"cluster.address = {address!r}: cannot connect to Ray ({err}); start it with "
                            "`ray start --head` or leave cluster.address empty for a local Ray") from None
        started = True
    if num_gpus is None:
        num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus > 0 else {})}
    pg = placement_group([dict(bundle) for _ in range(num_workers)], strategy="PACK")
    actors: list = []
    try:
        try:
            ray.get(pg.ready(), timeout=placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise UserError(f"the Ray cluster cannot fit {num_workers} trainer actors x {bundle} (available: "
                            f"{ray.available_resources()}); lower cluster.num_trainer_workers or "
                            "trainer_num_cpus / trainer_num_gpus") from None
        cls = ray.remote(TrainerActor)
        actors = [cls.options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0, max_task_retries=0,
                              scheduling_strategy=PlacementGroupSchedulingStrategy(
                                  placement_group=pg, placement_group_bundle_index=r))
                  .remote(max(1, int(num_cpus))) for r in range(num_workers)]
        nodes = ray.get([a.node.remote() for a in actors], timeout=placement_timeout_s)
        ray.get([a.setup.remote(env) for a, env in zip(actors, rank_envs(nodes))], timeout=placement_timeout_s)
        refs = [a.run.remote(fn, args) for a in actors]
        return _gather(ray, refs, run_timeout_s, straggler_timeout_s)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(pg)
        if started:
            ray.shutdown()


def _gather(ray, refs: list, run_timeout_s: float | None, straggler_timeout_s: float | None = None) -> list[Any]:
    rank_of = {ref: r for r, ref in enumerate(refs)}
    results: dict[int, Any] = {}
    failures: dict[int, BaseException] = {}
    pending = list(refs)
    deadline = None if run_timeout_s is None else time.monotonic() + run_timeout_s
    why = f"the Ray trainer ranks did not finish within {run_timeout_s} s"
    grace_end = None
    while pending:
        now = time.monotonic()
        ends = [t for t in (deadline, grace_end) if t is not None]
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, min(ends) - now) if ends else None)
        for ref in ready:
            try:
                results[rank_of[ref]] = ray.get(ref)
            except ray.exceptions.RayError as err:
                failures[rank_of[ref]] = err
        if failures and grace_end is None:
            grace_end = time.monotonic() + _GRACE_S
        if results and pending and straggler_timeout_s is not None and "finished" not in why:
            # the ranks run the same steps: one still running this long after another finished is stuck
            end = time.monotonic() + straggler_timeout_s
            if deadline is None or end < deadline:
                deadline = end
                why = f"rank {min(results)} finished, the others did not within {straggler_timeout_s:g} s"
        if not ready:
            if grace_end is not None and time.monotonic() >= grace_end:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise TrainerRankError(f"{why} (still running: ranks {sorted(rank_of[r] for r in pending)})")
    if failures:
        died = [r for r, e in sorted(failures.items()) if isinstance(e, ray.exceptions.RayActorError)]
        rank = died[0] if died else min(failures)
        err = failures[rank]
        what = "died" if died else "failed"
        cause = getattr(err, "cause", None)
        message = f"Ray trainer rank {rank} {what}: {_one_line(err)}"
        if isinstance(cause, UserError):
            raise UserError(message) from None
        raise TrainerRankError(message) from None
    return [results[r] for r in range(len(refs))]


def _train_rank(config: Any, overrides: list[str] | None, resume_from: str | Path | None, dataset: Any,
                timeout_s: float):
    """One trainer actor's work: join the ranks' group, train; rank 0 returns the TrainResult."""
    from align.distributed import init_from_env
    from align.trainer.loop import Trainer

    ctx = init_from_env(timeout_s=timeout_s)
    trainer = Trainer(config, overrides, resume_from, dataset=dataset)
    try:
        result = trainer.train()
    finally:
        trainer.close()
    return result if ctx.is_main else None


def train_on_actors(cfg, resume_from: str | Path | None, dataset: Any):
    """`train()` with `cluster.num_trainer_workers` ranks on Ray trainer actors; rank 0's TrainResult."""
    cc = cfg.cluster
    resume = str(Path(resume_from).resolve()) if resume_from else None
    results = launch(_train_rank, (cfg, None, resume, dataset, cc.trainer_timeout_s), num_workers=cc.num_trainer_workers,
                     num_cpus=cc.trainer_num_cpus, num_gpus=cc.trainer_num_gpus, address=cc.address,
                     placement_timeout_s=cc.placement_timeout_s, straggler_timeout_s=cc.trainer_timeout_s)
    return results[0]


__all__ = ["TrainerActor", "TrainerRankError", "in_trainer_actor", "launch", "rank_envs", "rollouts_colocated",
           "train_on_actors", "wants_trainer_actors"]
