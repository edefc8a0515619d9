"""The Ray backend class: settings (cluster keys and their ALIGN_RAY_* env overrides), start-up and close; the
work is in the mixins of placement.py, weights.py and dispatch.py."""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from align.backends.ray.dispatch import _Dispatch, _Step
from align.backends.ray.placement import _PARKED, _Actors
from align.backends.ray.weights import _WeightSync
from align.errors import UserError
from align.rewards.base import RewardFunction

log = logging.getLogger("align.backends.ray")


# Documented env overrides of `cluster` keys (docs/ray.md): when set (non-empty) they win over the config.
ENV_OVERRIDES = {
    "ALIGN_RAY_SCORE_TIMEOUT_S": "score_timeout_s",
    "ALIGN_RAY_GENERATE_TIMEOUT_S": "generate_timeout_s",
    "ALIGN_RAY_PLACEMENT_TIMEOUT_S": "placement_timeout_s",
    "ALIGN_RAY_WEIGHT_SYNC": "weight_sync",
    "ALIGN_RAY_KEEP_WORKERS": "keep_workers",
    "ALIGN_RAY_WEIGHT_SYNC_TIMEOUT_S": "weight_sync_timeout_s",
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


class RayBackend(_Actors, _WeightSync, _Dispatch):
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
                      "score_retries": 0, "score_timeouts": 0, "score_errors": 0, "sync_failures": 0}
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
