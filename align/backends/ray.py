"""The Ray backend: rollout and reward workers are Ray actors; the trainer is the single controller.

One step, as the loop drives it (`cluster.backend: ray`):

- generate: the step's prompts are cut into contiguous shards, dispatched round-robin to N
  `align.rollouts.worker.RolloutWorker` actors. Each generate task returns two objects: the `RolloutBatch` shard
  (fetched by the trainer, which trains on it) and a reward payload. With `cluster.pipeline` the payload's
  object ref goes straight to a `align.rewards.worker.RewardWorker` actor when the shard is submitted, so Ray
  scores shard k while shard k+1 is still generating, and the payload never passes through the driver.
- score: gathers the per-shard `RewardOutput`s in shard order (the order of the samples is preserved).
- sync: pushes the new weights once into the object store (LoRA adapters only when LoRA is on, else the full
  state dict) and has every rollout worker load them; versions are checked on every generate call.

Sampling is keyed by global sample ids, so 1 or N rollout workers draw the same tokens as the local engine.

Faults. Actors get `cluster.max_restarts` / `max_task_retries`. A restarted rollout worker (its weights lost)
refuses to sample (`StaleWeightsError`); the backend pushes the current weights and resubmits the shard.
A reward task that fails for an infrastructure reason (actor died after Ray's own retries, lost object) is
resubmitted once to a live worker (a dead actor is replaced); scoring is idempotent by sample id. A reward
task that raises, fails twice or exceeds `score_timeout_s` yields explicit per-sample errors, never a score:
the trainer excludes those samples. A hung worker is killed and replaced.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from align.backends.local import score_batch
from align.errors import UserError
from align.rewards.base import RewardFunction, RewardOutput
from align.rollouts.batch import RolloutBatch
from align.rollouts.params import SamplingParams
from align.rollouts.worker import ModelSpec, RolloutWorker, StaleWeightsError, reward_payload

log = logging.getLogger(__name__)

MAX_GENERATE_ATTEMPTS = 3

# Documented env overrides of `cluster` keys (docs/ray.md): when set (non-empty) they win over the config.
ENV_OVERRIDES = {
    "ALIGN_RAY_SCORE_TIMEOUT_S": "score_timeout_s",
    "ALIGN_RAY_GENERATE_TIMEOUT_S": "generate_timeout_s",
    "ALIGN_RAY_PLACEMENT_TIMEOUT_S": "placement_timeout_s",
    "ALIGN_RAY_WEIGHT_SYNC": "weight_sync",
    "ALIGN_RAY_KEEP_WORKERS": "keep_workers",
}


def cluster_settings(cc, environ=None):
    """`cc` (a ClusterConfig) with the `ALIGN_RAY_*` env overrides applied (a copy; `cc` is not changed)."""
    environ = os.environ if environ is None else environ
    changes: dict[str, Any] = {}
    for var, key in ENV_OVERRIDES.items():
        value = environ.get(var, "")
        if not value:
            continue
        if key == "keep_workers":
            changes[key] = value == "1"
        elif key == "weight_sync":
            changes[key] = value
        else:
            try:
                changes[key] = float(value)
            except ValueError:
                raise UserError(f"{var} = {value!r}: must be a number of seconds") from None
    try:
        return dataclasses.replace(cc, **changes)
    except UserError as err:
        names = ", ".join(f"{v}={environ[v]!r}" for v in ENV_OVERRIDES if environ.get(v))
        raise UserError(f"{err} (set by the environment: {names})") from None

# Warm rollout workers kept between runs of one driver (sweeps, notebooks, test suites): a closed backend parks
# its placement group and rollout actors here when `cluster.keep_workers` (env ALIGN_RAY_KEEP_WORKERS=1) is on,
# and the next backend with the same worker counts and resources takes them instead of starting new processes:
# they rebuild the new run's model in-process (`RolloutWorker.reset`) and get its full weights. Reward actors
# are never kept (they hold the run's reward).
_PARKED: list[tuple[tuple, Any, list]] = []


def release_parked_workers() -> int:
    """Kill the rollout actors parked by closed backends and free their resources; returns how many."""
    import ray

    count = 0
    while _PARKED:
        _key, pg, actors = _PARKED.pop()
        count += len(actors)
        if ray.is_initialized():
            for actor in actors:
                ray.kill(actor, no_restart=True)
            ray.util.remove_placement_group(pg)
    return count


def reward_runs_remotely(reward: RewardFunction) -> tuple[bool, str]:
    """Whether `reward` can be scored on reward actors without changing the run: it must pickle, keep no
    state the trainer checkpoints (running normalisation), and not score with the live policy."""
    components = getattr(reward, "rewards", [reward])
    if getattr(reward, "normalize", "none") == "running":
        return False, "reward.normalize = 'running' keeps its statistics in the trainer (they are checkpointed)"
    if any(hasattr(c, "bind_policy") for c in components):
        return False, "a reward scores with the live policy (bind_policy)"
    try:
        from ray import cloudpickle  # what Ray ships actor arguments with

        cloudpickle.dumps(reward)
    except Exception as err:  # noqa: BLE001 - any pickling failure means: cannot ship
        return False, f"the reward does not pickle ({type(err).__name__}: {err}); use callable classes, not closures"
    return True, ""


def error_output(n: int, message: str) -> RewardOutput:
    return RewardOutput(scores=[None] * n, errors=[message] * n)


def concat_outputs(outs: list[RewardOutput]) -> RewardOutput:
    """Join per-shard outputs in order; shards without token rewards get empty rows where others have them."""
    has_tokens = any(o.token_rewards is not None for o in outs)
    tokens = None
    if has_tokens:
        tokens = [row for o in outs for row in (o.token_rewards if o.token_rewards is not None else [[] for _ in o.scores])]
    return RewardOutput(scores=[s for o in outs for s in o.scores], errors=[e for o in outs for e in o.errors],
                        info=[i for o in outs for i in o.info], token_rewards=tokens)


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """`shards` contiguous, near-equal [lo, hi) ranges covering 0..n (no empty ones)."""
    shards = max(1, min(shards, n))
    base, extra = divmod(n, shards)
    out, lo = [], 0
    for s in range(shards):
        hi = lo + base + (1 if s < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


@dataclass
class _Shard:
    lo: int
    hi: int
    worker: int  # rollout actor index
    args: tuple  # (prompts, columns, sample_ids, params)
    batch_ref: Any = None
    payload_ref: Any = None
    score_ref: Any = None
    score_worker: int = -1
    batch: RolloutBatch | None = None


@dataclass
class _Step:
    shards: list[_Shard]
    prompts: list[str]
    completions: list[str] = field(default_factory=list)
    scores_dispatched: bool = False


class RayBackend:
    """`RayBackend(cfg, models, reward, engine)`: N rollout actors and M reward actors in one placement group.

    Its knobs are `cluster` keys (`score_timeout_s`, `generate_timeout_s`, `placement_timeout_s`, `weight_sync`,
    `keep_workers`), each overridable by an `ALIGN_RAY_*` env var (`cluster_settings`); the keyword arguments
    override both. `weight_sync`: any rollout worker restart falls back to the object store for the rest of
    the run. `stats` counts resyncs, replacements, retries, timeouts and errors.
    """

    def __init__(self, cfg, models, reward: RewardFunction, engine, *, score_timeout_s: float | None = None,
                 generate_timeout_s: float | None = None):
        import ray

        self.ray = ray
        self.cfg = cfg
        self.cc = cc = cluster_settings(cfg.cluster)
        self.models = models
        self.reward = reward
        self.engine = engine
        self.score_timeout_s = score_timeout_s or cc.score_timeout_s
        self.generate_timeout_s = generate_timeout_s or cc.generate_timeout_s
        self.placement_timeout_s = cc.placement_timeout_s
        self.keep_workers = cc.keep_workers
        self.stats = {"weight_pushes": 0, "weight_broadcasts": 0, "resyncs": 0, "rollout_replacements": 0, "reward_replacements": 0,
                      "score_retries": 0, "score_timeouts": 0, "score_errors": 0}
        self._started_ray = False
        if not ray.is_initialized():
            try:
                ray.init(address=cc.address or None, log_to_driver=True)
            except ConnectionError as err:
                raise UserError(f"cluster.address = {cc.address!r}: cannot connect to Ray ({err}); start it with "
                                "`ray start --head` or leave cluster.address empty for a local Ray") from None
            self._started_ray = True
        self.remote_reward, why = reward_runs_remotely(reward)
        if not self.remote_reward:
            log.warning("Ray backend: scoring in the trainer process, not on reward workers: %s", why)
        self.reward_in_driver_reason = why
        self.version = 0
        self.version_pushed = 0  # what every healthy rollout worker holds
        self._step: _Step | None = None
        self._last_ids: tuple[list[str], list[int]] | None = None
        mode = cc.weight_sync
        self._group_backend: str | None = None
        self.rollout_actors: list = []
        self.reward_actors: list = []
        self._pg = None
        self._pool_key = self._make_pool_key()
        try:
            self._start_workers()
            self._push_weights(0, "full")
            if mode == "collective" or (mode == "auto" and cc.rollout_num_gpus > 0 and models.device.type == "cuda"):
                self._join_group()
            # surface a reward that cannot be built on a worker now, not at the first score
            self.ray.get([a.health.remote() for a in self.reward_actors], timeout=self.placement_timeout_s)
        except (self.ray.exceptions.RayError, self.ray.exceptions.GetTimeoutError) as err:
            self.close()
            lines = [x for x in str(err).splitlines() if x.strip()]
            raise UserError(f"the Ray workers could not start: {lines[-1] if lines else err} (a reward or model class "
                            "defined in a module the workers cannot import must be shipped by value: "
                            "ray.cloudpickle.register_pickle_by_value(module))") from None
        except BaseException:
            self.close()
            raise

    def _start_workers(self) -> None:
        """Rollout actors (warm parked ones when there are, see `keep_workers`) and fresh reward actors."""
        cc = self.cc
        parked = next((u for u in _PARKED if u[0] == self._pool_key), None)
        if parked is not None:
            _PARKED.remove(parked)
            self._pg, self.rollout_actors = parked[1], list(parked[2])
            try:  # rebuild this run's model in the warm processes
                self.ray.get([a.reset.remote(*self._worker_args()[:3]) for a in self.rollout_actors], timeout=self.placement_timeout_s)
            except (self.ray.exceptions.RayError, self.ray.exceptions.GetTimeoutError):
                for i, actor in enumerate(self.rollout_actors):
                    self.ray.kill(actor, no_restart=True)
                    self.rollout_actors[i] = self._new_rollout_actor(i)
        else:
            self._pg = self._placement_group()
            self.rollout_actors = [self._new_rollout_actor(i) for i in range(cc.num_rollout_workers)]
        self.reward_actors = [self._new_reward_actor(j) for j in range(cc.num_reward_workers)] if self.remote_reward else []

    # ------------------------------------------------------------------------------------------ actors
    @property
    def _num_reward_bundles(self) -> int:
        return self.cc.num_reward_workers if self.remote_reward else 0

    def _make_pool_key(self) -> tuple:
        cc = self.cc
        return (self.ray.get_runtime_context().get_job_id(), cc.num_rollout_workers, cc.rollout_num_cpus,
                cc.rollout_num_gpus, self._num_reward_bundles, cc.reward_num_cpus, cc.max_restarts, cc.max_task_retries)

    def _placement_group(self):
        """One bundle per actor, packed onto as few nodes as possible (rollout and reward workers co-located)."""
        from ray.util.placement_group import placement_group

        cc = self.cc
        rollout = {k: v for k, v in (("CPU", cc.rollout_num_cpus), ("GPU", cc.rollout_num_gpus)) if v > 0} or {"CPU": 0.01}
        reward = {"CPU": cc.reward_num_cpus} if cc.reward_num_cpus > 0 else {"CPU": 0.01}
        bundles = [dict(rollout) for _ in range(cc.num_rollout_workers)] + [dict(reward) for _ in range(self._num_reward_bundles)]
        pg = placement_group(bundles, strategy="PACK")
        try:
            self.ray.get(pg.ready(), timeout=self.placement_timeout_s)
        except self.ray.exceptions.GetTimeoutError:
            self.ray.util.remove_placement_group(pg)
            raise UserError(f"the Ray cluster cannot fit {cc.num_rollout_workers} rollout workers x {rollout} and "
                            f"{self._num_reward_bundles} reward workers x {reward} (available: "
                            f"{self.ray.available_resources()}); lower cluster.num_rollout_workers / "
                            "num_reward_workers or their num_cpus / num_gpus") from None
        return pg

    def _strategy(self, bundle: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(placement_group=self._pg, placement_group_bundle_index=bundle)

    def _model_spec(self) -> ModelSpec:
        policy = self.models.policy
        base = policy.get_base_model() if self.models.lora else policy
        lora = policy.peft_config["default"] if self.models.lora else None
        dtype = next(policy.parameters()).dtype
        mc = self.cfg.model
        return ModelSpec(path=mc.path, config=base.config, dtype=dtype, trust_remote_code=mc.trust_remote_code, lora=lora)

    def _worker_args(self) -> tuple:
        e = self.engine
        engine_kwargs = dict(sampler_backend=e.sampler_backend, micro_batch_size=e.micro_batch_size,
                             max_prompt_length=e.max_prompt_length, gate_top_k=e.gate_top_k)
        return self._model_spec(), self.models.tokenizer, engine_kwargs, "auto", max(1, int(self.cc.rollout_num_cpus))

    def _new_rollout_actor(self, i: int):
        cc = self.cc
        actor_cls = self.ray.remote(RolloutWorker)
        return actor_cls.options(
            num_cpus=cc.rollout_num_cpus, num_gpus=cc.rollout_num_gpus, max_restarts=cc.max_restarts,
            max_task_retries=cc.max_task_retries, scheduling_strategy=self._strategy(i),
        ).remote(*self._worker_args())

    def _new_reward_actor(self, j: int):
        from align.rewards.worker import RewardWorker

        cc = self.cc
        actor_cls = self.ray.remote(RewardWorker)
        return actor_cls.options(
            num_cpus=cc.reward_num_cpus, max_restarts=cc.max_restarts, max_task_retries=cc.max_task_retries,
            scheduling_strategy=self._strategy(cc.num_rollout_workers + j),
        ).remote(self.reward)

    def _alive(self, actor) -> bool:
        try:
            self.ray.get(actor.health.remote(), timeout=60)
            return True
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.GetTimeoutError):
            return False

    def _replace_rollout(self, i: int) -> None:
        self._leave_group(workers_too=True)  # the new process is not in the broadcast group
        self.ray.kill(self.rollout_actors[i], no_restart=True)
        self.rollout_actors[i] = self._new_rollout_actor(i)
        self.stats["rollout_replacements"] += 1
        self._resync(i)

    def _replace_reward(self, j: int) -> None:
        self.ray.kill(self.reward_actors[j], no_restart=True)
        self.reward_actors[j] = self._new_reward_actor(j)
        self.stats["reward_replacements"] += 1

    # ------------------------------------------------------------------------------------------ weights
    def _state(self, kind: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        policy = self.models.policy
        if kind == "adapters":
            from peft import get_peft_model_state_dict

            state = get_peft_model_state_dict(policy)
        else:
            state = policy.state_dict()
        return {k: v.detach().to(device) for k, v in state.items()}

    def _push_weights(self, version: int, kind: str, actors: list[int] | None = None) -> None:
        """Put the weights in the object store once; every (listed) rollout worker loads them as `version`."""
        ref = self.ray.put(self._state(kind))
        targets = range(len(self.rollout_actors)) if actors is None else actors
        got = self.ray.get([self.rollout_actors[i].load_weights.remote(ref, version, kind) for i in targets],
                           timeout=self.generate_timeout_s)
        if any(v != version for v in got):
            raise RuntimeError(f"weight sync: workers report versions {got}, expected {version}")
        self.stats["weight_pushes"] += 1

    def _join_group(self) -> None:
        """Trainer = rank 0, rollout worker i = rank i + 1, for broadcast weight syncs."""
        import datetime
        import socket

        import torch.distributed as dist

        if dist.is_initialized():
            log.warning("Ray backend: torch.distributed is already in use in the trainer; weights go through the object store")
            return
        backend = "nccl" if self.models.device.type == "cuda" and self.cc.rollout_num_gpus > 0 else "gloo"
        ip = self.ray.util.get_node_ip_address()
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        init = f"tcp://{ip}:{port}"
        world = len(self.rollout_actors) + 1
        joins = [a.join_weight_group.remote(init, world, i + 1, backend) for i, a in enumerate(self.rollout_actors)]
        dist.init_process_group(backend, init_method=init, world_size=world, rank=0,
                                timeout=datetime.timedelta(seconds=self.placement_timeout_s))
        self.ray.get(joins, timeout=self.placement_timeout_s)
        self._group_backend = backend

    def _leave_group(self, workers_too: bool) -> None:
        import torch.distributed as dist

        if self._group_backend is None:
            return
        self._group_backend = None
        if workers_too:
            try:
                self.ray.get([a.leave_weight_group.remote() for a in self.rollout_actors], timeout=30)
            except Exception:  # noqa: BLE001 - a dead worker has no group to leave
                pass
        if dist.is_initialized():
            dist.destroy_process_group()

    def _broadcast_weights(self, version: int, kind: str) -> bool:
        """Broadcast to every rollout worker; False (and the group is dropped) when a worker is not the one
        that joined (restarted: version differs) or the broadcast fails."""
        from align.rollouts.worker import broadcast_flat

        ray = self.ray
        try:
            held = ray.get([a.weights_version.remote() for a in self.rollout_actors], timeout=60)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            held = None
        if held is None or any(v != self.version_pushed for v in held):
            log.warning("Ray backend: a rollout worker restarted; weights go through the object store from now on")
            self._leave_group(workers_too=True)
            return False
        device = self.models.device if self._group_backend == "nccl" else torch.device("cpu")
        state = {k: v.detach() for k, v in self._state(kind, device).items()}
        meta = [(k, tuple(v.shape), v.dtype) for k, v in state.items()]
        refs = [a.receive_weights.remote(version, kind, meta) for a in self.rollout_actors]
        broadcast_flat(state, device)
        got = ray.get(refs, timeout=self.generate_timeout_s)
        if any(v != version for v in got):
            raise RuntimeError(f"weight sync: workers report versions {got}, expected {version}")
        return True

    def _resync(self, i: int) -> None:
        """A worker lost its weights (restart) or missed a sync: give it the trainer's current full weights.
        A restarted worker is a new process outside the broadcast group, so the group is dropped."""
        self._leave_group(workers_too=True)
        # a restart re-ran the constructor with the arguments the actor was created with (a warm actor may
        # have served another model since): rebuild this run's model first
        self.ray.get(self.rollout_actors[i].reset.remote(*self._worker_args()[:3]), timeout=self.placement_timeout_s)
        self._push_weights(self.version, "full", [i])
        self.stats["resyncs"] += 1

    def sync(self, version: int) -> None:
        self.version = int(version)
        kind = "adapters" if self.models.lora else "full"
        if self._group_backend is not None and self._broadcast_weights(self.version, kind):
            self.stats["weight_broadcasts"] += 1
        else:
            self._push_weights(self.version, kind)
        self.version_pushed = self.version

    def worker_state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Every rollout worker's weights (for checks that they equal the trainer's)."""
        return self.ray.get([a.state_dict.remote() for a in self.rollout_actors])

    # ------------------------------------------------------------------------------------------ generate
    def _num_shards(self, n: int) -> int:
        workers = len(self.rollout_actors)
        if self.cc.pipeline and self.remote_reward:
            # one shard per engine micro-batch (the engine decodes micro-batches one after another anyway), so
            # scoring shard k overlaps generating shard k+1 without adding decode passes
            return min(n, max(workers, math.ceil(n / max(1, self.engine.micro_batch_size))))
        return min(n, workers)

    def _submit_generate(self, shard: _Shard) -> None:
        actor = self.rollout_actors[shard.worker]
        shard.batch_ref, shard.payload_ref = actor.generate.options(num_returns=2).remote(*shard.args, self.version)
        shard.batch = None
        if self.cc.pipeline and self.remote_reward:
            self._submit_score(shard, shard.score_worker if shard.score_worker >= 0 else None)

    def _submit_score(self, shard: _Shard, worker: int | None = None, index: int = 0) -> None:
        j = (index % len(self.reward_actors)) if worker is None else worker
        shard.score_worker = j
        shard.score_ref = self.reward_actors[j].score.remote(shard.payload_ref)

    def generate(self, prompts: list[str], columns: dict[str, list[Any]], sample_ids: torch.Tensor,
                 params: SamplingParams) -> RolloutBatch:
        n = len(prompts)
        sample_ids = torch.as_tensor(sample_ids)
        shards = []
        for s, (lo, hi) in enumerate(shard_bounds(n, self._num_shards(n))):
            args = (prompts[lo:hi], {k: v[lo:hi] for k, v in columns.items()}, sample_ids[lo:hi], params)
            shard = _Shard(lo, hi, s % len(self.rollout_actors), args)
            if self.remote_reward:
                shard.score_worker = s % len(self.reward_actors)
            shards.append(shard)
        for shard in shards:
            self._submit_generate(shard)
        for shard in shards:
            shard.batch = self._gather_generate(shard)
        batch = RolloutBatch.concat([s.batch for s in shards], pad_token_id=self.engine.pad_id)
        if batch.weights_version != self.version:  # the workers check this too; never train on stale samples
            raise RuntimeError(f"a rollout was sampled with weights version {batch.weights_version}, not {self.version}")
        self._step = _Step(shards, list(batch.prompts), list(batch.completions),
                           scores_dispatched=bool(self.cc.pipeline and self.remote_reward))
        self._last_ids = (list(batch.completions), sample_ids.tolist())
        return batch

    def _gather_generate(self, shard: _Shard) -> RolloutBatch:
        ray = self.ray
        last: Exception | None = None
        for _ in range(MAX_GENERATE_ATTEMPTS):
            try:
                return ray.get(shard.batch_ref, timeout=self.generate_timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise RuntimeError(f"rollout worker {shard.worker} did not finish a shard of {shard.hi - shard.lo} "
                                   f"samples in {self.generate_timeout_s:.0f} s") from None
            except ray.exceptions.RayTaskError as err:
                if not isinstance(err, StaleWeightsError) and not isinstance(getattr(err, "cause", None), StaleWeightsError):
                    raise
                last = err
                self._resync(shard.worker)  # a restart lost the weights: push them, sample again
            except ray.exceptions.RayActorError as err:
                last = err
                if self._alive(self.rollout_actors[shard.worker]):
                    self._resync(shard.worker)
                else:
                    self._replace_rollout(shard.worker)
            self._submit_generate(shard)
        raise RuntimeError(f"rollout shard [{shard.lo}, {shard.hi}) failed {MAX_GENERATE_ATTEMPTS} times; last error: {last}")

    # ------------------------------------------------------------------------------------------ score
    def score(self, batch: RolloutBatch) -> RewardOutput:
        if not self.remote_reward:
            return score_batch(self.reward, batch)
        step = self._step
        self._step = None
        if step is None or step.prompts != list(batch.prompts) or step.completions != list(batch.completions):
            step = self._step_for_unknown_batch(batch)
        if not step.scores_dispatched:
            for k, shard in enumerate(step.shards):
                self._submit_score(shard, None, k)
        return concat_outputs(self._gather_scores(step.shards))

    def _step_for_unknown_batch(self, batch: RolloutBatch) -> _Step:
        """A batch this backend did not generate (or generated earlier): payloads are built here."""
        ids = None
        if self._last_ids is not None and self._last_ids[0] == list(batch.completions):
            ids = self._last_ids[1]
        shards = []
        for lo, hi in shard_bounds(len(batch), len(self.reward_actors)):
            part = batch.select(list(range(lo, hi)))
            shard = _Shard(lo, hi, -1, ())
            shard.payload_ref = self.ray.put(reward_payload(part, ids[lo:hi] if ids is not None else None))
            shards.append(shard)
        return _Step(shards, list(batch.prompts), list(batch.completions))

    def _gather_scores(self, shards: list[_Shard]) -> list[RewardOutput]:
        ray = self.ray
        deadline = time.monotonic() + self.score_timeout_s
        outs: list[RewardOutput | None] = [None] * len(shards)
        retried: set[int] = set()
        while True:
            todo = [k for k, o in enumerate(outs) if o is None]
            if not todo:
                return outs
            refs = [shards[k].score_ref for k in todo]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=max(0.0, deadline - time.monotonic()))
            ready_set = set(ready)
            resubmit = []
            hung = sorted({shards[k].score_worker for k in todo if shards[k].score_ref not in ready_set})
            for j in hung:  # a hung tool call or model: kill and replace the worker (its task cannot be cancelled)
                self._replace_reward(j)
            for k in todo:
                shard, n = shards[k], shards[k].hi - shards[k].lo
                if shard.score_ref not in ready_set:
                    outs[k] = error_output(n, f"reward scoring timed out after {self.score_timeout_s:g} s "
                                              f"(reward worker {shard.score_worker} was replaced)")
                    self.stats["score_timeouts"] += 1
                    continue
                try:
                    outs[k] = ray.get(shard.score_ref)
                except ray.exceptions.RayTaskError as err:
                    cause = getattr(err, "cause", None)
                    if isinstance(cause, ray.exceptions.RayError) and k not in retried:
                        resubmit.append(k)  # e.g. its generate task's object was lost: try once more
                        continue
                    outs[k] = error_output(n, f"reward worker error: {type(cause or err).__name__}: "
                                              f"{str(cause or err).strip().splitlines()[-1] if str(cause or err).strip() else ''}")
                    self.stats["score_errors"] += 1
                except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as err:
                    if k in retried:
                        outs[k] = error_output(n, f"reward worker failed twice: {type(err).__name__}")
                        self.stats["score_errors"] += 1
                        continue
                    if not self._alive(self.reward_actors[shard.score_worker]):
                        self._replace_reward(shard.score_worker)
                    resubmit.append(k)
            for k in resubmit:
                retried.add(k)
                self.stats["score_retries"] += 1
                self._submit_score(shards[k], shards[k].score_worker)
                deadline = max(deadline, time.monotonic() + self.score_timeout_s)

    # ------------------------------------------------------------------------------------------ close
    def close(self) -> None:
        ray = self.ray
        try:
            if ray.is_initialized():
                self._leave_group(workers_too=True)
                closing = [a.close.remote() for a in self.reward_actors]
                try:
                    ray.get(closing, timeout=10)
                except Exception:  # noqa: BLE001 - best effort: a dead worker has nothing to close
                    pass
                for actor in self.reward_actors:
                    ray.kill(actor, no_restart=True)
                if self.keep_workers and not self._started_ray and self.rollout_actors:
                    _PARKED.append((self._pool_key, self._pg, list(self.rollout_actors)))
                else:
                    for actor in self.rollout_actors:
                        ray.kill(actor, no_restart=True)
                    if self._pg is not None:
                        ray.util.remove_placement_group(self._pg)
        finally:
            self.rollout_actors, self.reward_actors, self._pg = [], [], None
            self.reward.close()
            if self._started_ray and ray.is_initialized():
                ray.shutdown()


__all__ = ["RayBackend", "cluster_settings", "release_parked_workers", "reward_runs_remotely", "shard_bounds", "concat_outputs"]
