"""Ray backend, placement and actors: one placement group, rollout / reward actors, their replacement, and the
warm rollout workers parked between runs of one driver."""
from __future__ import annotations

from typing import Any

from align.errors import UserError
from align.rollouts.worker import ModelSpec, RolloutWorker

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


class _Actors:
    """RayBackend's actor management (a mixin: state lives on the backend)."""

    def _start_workers(self) -> None:
        """Rollout actors (warm parked ones when there are, see `keep_workers`) and fresh reward actors."""
        cc = self.cc
        parked = next((u for u in _PARKED if u[0] == self._pool_key), None)
        if parked is not None:
            _PARKED.remove(parked)
            self._pg, self.rollout_actors = parked[1], list(parked[2])
            try:  # rebuild this run's model in the warm processes
                args = self._worker_args()
                self.ray.get([a.reset.remote(*args[:3], args[5]) for a in self.rollout_actors], timeout=self.placement_timeout_s)
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
        from align.tool_env import episodes_factory

        return (self._model_spec(), self.models.tokenizer, engine_kwargs, "auto", max(1, int(self.cc.rollout_num_cpus)),
                episodes_factory(self.cfg.rollout))

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
