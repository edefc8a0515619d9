"""The infrastructure sections of a run config: where rollouts and rewards run (`cluster`), training across
ranks (`distributed`), logging and checkpoints. Validated like every section (`align.config_schema`);
`align.config` re-exports them."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from align.config_schema import Section


@dataclass
class ClusterConfig(Section):
    """Where rollouts and rewards run: in the trainer process (`local`) or on Ray actors (`ray`, see docs/ray.md).
    An env var named in a note (`ALIGN_RAY_*`), when set, overrides that key for the Ray backend."""

    backend: Literal["local", "ray"] = "local"
    address: str = ""  # "" starts a local Ray instance; "auto" or "ray://HOST:10001" joins a cluster
    num_rollout_workers: int = 1
    num_reward_workers: int = 1
    rollout_num_gpus: float = 0.0
    rollout_num_cpus: float = 1.0
    reward_num_cpus: float = 1.0
    max_restarts: int = 2
    max_task_retries: int = 2
    pipeline: bool = True  # score shard k while generating shard k+1
    score_timeout_s: float = 600.0  # a reward worker taking longer is replaced; its samples get explicit errors; env ALIGN_RAY_SCORE_TIMEOUT_S
    generate_timeout_s: float = 3600.0  # bound on one rollout shard (and one weight push); env ALIGN_RAY_GENERATE_TIMEOUT_S
    placement_timeout_s: float = 120.0  # wait this long for the placement group / worker start-up; env ALIGN_RAY_PLACEMENT_TIMEOUT_S
    # object_store: ray.put once, every worker loads; collective: torch.distributed broadcast from the trainer
    # (NCCL between GPUs, gloo on CPUs); auto: collective when the trainer and the rollout workers have GPUs;
    weight_sync: Literal["auto", "object_store", "collective"] = "auto"  # env ALIGN_RAY_WEIGHT_SYNC
    keep_workers: bool = False  # park warm rollout workers at close for the next run in this driver; env ALIGN_RAY_KEEP_WORKERS=1 / 0
    # weight sync by broadcast: buckets of at most this many MB (the largest extra buffer either side builds)
    weight_sync_bucket_mb: float = 256.0
    weight_sync_timeout_s: float = 300.0  # a broadcast sync that fails or stalls longer raises / falls back; env ALIGN_RAY_WEIGHT_SYNC_TIMEOUT_S
    # Ray trainer actors (docs/ray.md): N > 1 runs N SPMD trainer ranks in a placement group, rollouts and
    # rewards colocated on each rank (the local backend inside each actor); 1 = the single-controller trainer
    num_trainer_workers: int = 1
    trainer_num_cpus: float = 1.0  # per trainer actor; its torch threads are pinned to this share
    trainer_num_gpus: float | None = None  # per trainer actor; null: 1 when the Ray cluster has GPUs, else 0
    trainer_timeout_s: float = 300.0  # process-group timeout of the trainer ranks: a stalled rank ends the run

    def validate(self) -> None:
        self.check(self.num_rollout_workers >= 1, "num_rollout_workers", "must be >= 1")
        self.check(self.num_reward_workers >= 1, "num_reward_workers", "must be >= 1")
        self.check(self.score_timeout_s > 0, "score_timeout_s", "must be > 0")
        self.check(self.generate_timeout_s > 0, "generate_timeout_s", "must be > 0")
        self.check(self.placement_timeout_s > 0, "placement_timeout_s", "must be > 0")
        self.check(self.weight_sync_bucket_mb > 0, "weight_sync_bucket_mb", "must be > 0")
        self.check(self.weight_sync_timeout_s > 0, "weight_sync_timeout_s", "must be > 0")
        self.check(self.num_trainer_workers >= 1, "num_trainer_workers", "must be >= 1")
        self.check(self.num_trainer_workers == 1 or self.backend == "ray", "num_trainer_workers",
                   "> 1 needs cluster.backend: ray (with the local backend, start the ranks with torchrun)")
        self.check(self.trainer_num_cpus > 0, "trainer_num_cpus", "must be > 0")
        self.check(self.trainer_num_gpus is None or self.trainer_num_gpus >= 0, "trainer_num_gpus", "must be >= 0 (or null)")
        self.check(self.trainer_timeout_s > 0, "trainer_timeout_s", "must be > 0")


@dataclass
class DistributedConfig(Section):
    """Training across ranks (torchrun or Ray trainer actors; docs/distributed.md). Read only at world size > 1."""

    mixed_precision: Literal["none", "bf16"] = "none"  # bf16: bf16 compute params, fp32 gradient reduction (GPU)
    cpu_offload: bool = False  # shards of params, gradients and optimizer state live in CPU memory (GPU runs)
    reshard_after_forward: bool = True  # free gathered policy/critic layers after forward (memory) or keep (speed)
    timeout_s: float = 600.0  # bound on every collective: a dead or stalled rank ends the run within it
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl (+ gloo for CPU tensors) with CUDA, gloo on CPU
    threads_per_rank: int = 0  # torch threads of each rank; 0 = cores / local ranks (threads x ranks <= cores)

    def validate(self) -> None:
        self.check(self.timeout_s > 0 and math.isfinite(self.timeout_s), "timeout_s", "must be a positive number of seconds")
        self.check(self.threads_per_rank >= 0, "threads_per_rank", "must be >= 0 (0 = cores / local ranks)")


REPORT_TO = ("jsonl", "tensorboard", "wandb")


@dataclass
class LoggingConfig(Section):
    run_dir: str = "runs/{name}"
    name: str = "run"
    progress: bool = True
    tensorboard: bool = False  # the same as adding "tensorboard" to report_to
    print_every: int = 1
    # where step metrics go: jsonl (RUN_DIR/metrics.jsonl), tensorboard (RUN_DIR/tb), wandb (pip install wandb)
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])
    completions_every: int = 0  # steps between completions tables (RUN_DIR/completions.jsonl); 0 = off
    completions_rows: int = 8  # samples per table (the first rows of the step)
    wandb_project: str = "align"
    wandb_init_timeout_s: float = 90.0  # wandb.init waits this long for its service process, then fails

    def validate(self) -> None:
        self.check(self.print_every >= 0, "print_every", "must be >= 0 (0 = quiet)")
        unknown = [r for r in self.report_to if r not in REPORT_TO]
        self.check(not unknown, "report_to", f"unknown {unknown}; pick from {list(REPORT_TO)}")
        self.check(self.completions_every >= 0, "completions_every", "must be >= 0 (0 = off)")
        self.check(self.completions_rows >= 1, "completions_rows", "must be >= 1")
        self.check(self.wandb_init_timeout_s > 0, "wandb_init_timeout_s", "must be > 0")

    @property
    def reporters(self) -> list[str]:
        """report_to with the older `tensorboard: true` folded in."""
        return list(dict.fromkeys([*self.report_to, *(["tensorboard"] if self.tensorboard else [])]))


@dataclass
class CheckpointConfig(Section):
    every: int = 0  # steps between checkpoints; 0 = only the final one
    keep_last: int = 2
    save_final: bool = True
    resume_from: str = ""  # a run directory or a checkpoint directory
    # false: no optimizer state in checkpoints (smaller; resume then restarts the optimizer's moments, with a warning)
    save_optimizer: bool = True
    overwrite: bool = False  # start a new run in a run directory that holds one (its metrics and checkpoints removed)

    def validate(self) -> None:
        self.check(self.every >= 0, "every", "must be >= 0")
        self.check(self.keep_last >= 1, "keep_last", "must be >= 1")
