"""Ray backend, dispatch: shards of a step sent to rollout actors, rewards scored on reward actors (pipelined),
failures retried or turned into explicit per-sample errors."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from align.backends.local import score_batch
from align.rewards.base import RewardOutput
from align.rollouts.batch import RolloutBatch
from align.rollouts.params import SamplingParams
from align.rollouts.worker import StaleWeightsError, reward_payload

MAX_GENERATE_ATTEMPTS = 3


def error_output(n: int, message: str) -> RewardOutput:
    return RewardOutput(scores=[None] * n, errors=[message] * n)


def concat_outputs(outs: list[RewardOutput]) -> RewardOutput:
    """Join per-shard outputs in order; shards without token rewards get empty rows where others have them."""
    has_tokens = any(o.token_rewards is not None for o in outs)
    tokens = None
    if has_tokens:
        tokens = [row for o in outs for row in (o.token_rewards if o.token_rewards is not None else [[] for _ in o.scores])]
    logged: dict[str, list[float]] = {}
    for o in outs:
        for k, v in o.metrics.items():
            logged.setdefault(k, []).append(v)
    # a log_metric value per shard, averaged across shards as TRL averages it across processes
    return RewardOutput(scores=[s for o in outs for s in o.scores], errors=[e for o in outs for e in o.errors],
                        info=[i for o in outs for i in o.info], token_rewards=tokens,
                        metrics={k: sum(v) / len(v) for k, v in logged.items()})


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


class _Dispatch:
    """RayBackend's generate / score (a mixin: state lives on the backend)."""

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
