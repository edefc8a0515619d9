"""The Ray backend: rollout and reward workers are Ray actors; the trainer is the single controller.

One step, as the loop drives it (`cluster.backend: ray`):

- generate: the step's prompts are cut into contiguous shards, dispatched round-robin to N
  `align.rollouts.worker.RolloutWorker` actors. Each generate task returns two objects: the `RolloutBatch` shard
  (fetched by the trainer, which trains on it) and a reward payload. With `cluster.pipeline` the payload's
  object ref goes straight to a `align.rewards.worker.RewardWorker` actor when the shard is submitted, so Ray
  scores shard k while shard k+1 is still generating, and the payload never passes through the driver.
- score: gathers the per-shard `RewardOutput`s in shard order (the order of the samples is preserved).
- sync: pushes the new weights once into the object store (LoRA adapters only when LoRA is on, else the full
  state dict) and has every rollout worker load them, or broadcasts them in bounded buckets in a private
  gloo / NCCL group (`weight_sync`; a failed or stalled broadcast recovers through the object store); versions
  are checked on every generate call.

Sampling is keyed by global sample ids, so 1 or N rollout workers draw the same tokens as the local engine.

Faults. Actors get `cluster.max_restarts` / `max_task_retries`. A restarted rollout worker (its weights lost)
refuses to sample (`StaleWeightsError`); the backend pushes the current weights and resubmits the shard.
A reward task that fails for an infrastructure reason (actor died after Ray's own retries, lost object) is
resubmitted once to a live worker (a dead actor is replaced); scoring is idempotent by sample id. A reward
task that raises, fails twice or exceeds `score_timeout_s` yields explicit per-sample errors, never a score:
the trainer excludes those samples. A hung worker is killed and replaced.

Modules: `backend` (RayBackend: settings, start-up, close), `placement` (placement group, actors, parked warm
workers), `dispatch` (generate / score across shards, fault handling), `weights` (weight sync). Every public
name is importable from here.
"""
from __future__ import annotations

from align.backends.ray.backend import ENV_OVERRIDES, RayBackend, cluster_settings, reward_runs_remotely
from align.backends.ray.dispatch import MAX_GENERATE_ATTEMPTS, concat_outputs, error_output, shard_bounds
from align.backends.ray.placement import release_parked_workers

__all__ = ["RayBackend", "cluster_settings", "release_parked_workers", "reward_runs_remotely", "shard_bounds", "concat_outputs",
           "ENV_OVERRIDES", "MAX_GENERATE_ATTEMPTS", "error_output"]
