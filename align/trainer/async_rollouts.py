"""Bounded staleness (`train.max_staleness: k >= 1`): generation and scoring run ahead of training in a bounded
queue, on a background thread, while the trainer trains (docs/async.md).

Schedule (deterministic, so a run does not depend on thread timing): the batch trained at step n is generated
and scored by job n, which is submitted at the start of step max(0, n - k) with the weights of that step's start
(version max(0, n - k)); at most k jobs run ahead of the step being trained (the queue bound). A job is the
synchronous loop's own generate and score phases (`RolloutPhases.phase_generate` / `phase_score`), run on a
shallow copy of the trainer whose backend is the rollout side and whose `step` is the job's version, so data
order, sample ids and reward `trainer_state` follow the same rules as the synchronous loop.

Rollout side: local backend: a copy of the policy in the same process, loaded with a snapshot of the trainer's
weights published at each version boundary (phase_sync). Ray backend: the rollout actors; a weight push waits
until every submitted job has finished generating (an actor holds one version), so on Ray a job's weights are
exactly its version too.

Drop rule: at the start of a step every sample's version (`RolloutBatch.versions`) is checked against the
trainer's; groups holding a sample more than k versions old are dropped, regenerated with the current weights
(same prompts and sample ids) and rescored, and counted in async/dropped. The schedule never produces one; a
resume, a manual queue edit or a future scheduler could.

Resume: a checkpoint waits for the jobs in flight, then stores the queued (generated and scored) batches with the
data cursor and reward state as of the newest of them; a resume trains on them first, so the continuation is
exact (tests/trainer/test_async_staleness.py).
"""
from __future__ import annotations

import copy
import threading
import time
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from align.errors import UserError
from align.rewards.trl_kwargs import TRAINER_STATE
from align.rollouts.batch import RolloutBatch
from align.trainer.rollout_phases import RolloutPhases
from align.trainer.state import StepData


@dataclass
class _Job:
    index: int  # the training step it is for
    version: int  # the weights version it is drawn with
    weights: dict[str, torch.Tensor] | None = None  # local backend: the snapshot of `version`
    seen: int = 0  # samples drawn before it (its sample ids start here; set when it runs)
    generated: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    result: tuple[StepData, dict[str, float]] | None = None
    error: BaseException | None = None


def check_async_supported(trainer) -> None:
    """One-line refusals of what k >= 1 does not support yet."""
    from align.distributed.context import get_context

    k = trainer.cfg.train.max_staleness
    if get_context().world_size > 1:
        raise UserError(f"train.max_staleness = {k} runs with one trainer rank only; set train.max_staleness: 0 "
                        "for multi-rank training")
    if trainer.algo.sampling_rounds > 1:
        raise UserError(f"train.max_staleness = {k} cannot refill a step (dynamic sampling); set "
                        "algo.dynamic_sampling.enable: false or train.max_staleness: 0")
    if any(hasattr(c, "bind_policy") for c in getattr(trainer.reward, "rewards", [trainer.reward])):
        raise UserError(f"train.max_staleness = {k}: a reward that scores with the live policy would read weights "
                        "the trainer is updating; set train.max_staleness: 0 for this reward")


class _LocalRolloutSide:
    """The rollout copy of the policy (its own engine); `generate` tags each sample with its version."""

    def __init__(self, trainer):
        from align.rollouts.engine import RolloutEngine

        cfg = trainer.cfg
        self.model = copy.deepcopy(trainer.models.policy).eval()
        self.names = {k for k, _ in self.model.named_parameters()}
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.engine = RolloutEngine(self.model, trainer.tokenizer, sampler_backend=cfg.rollout.sampler_backend,
                                    micro_batch_size=cfg.rollout.micro_batch_size,
                                    max_prompt_length=cfg.data.max_prompt_length, gate_top_k=trainer.engine.gate_top_k)
        self.reward = trainer.reward
        self.partial = cfg.rollout.partial
        self.chunk = cfg.rollout.partial_chunk_tokens
        self.loaded = -1
        self.latest: tuple[int, dict[str, torch.Tensor]] | None = None  # (version, snapshot) published by sync
        self.lock = threading.Lock()

    def load(self, version: int, weights: dict[str, torch.Tensor]) -> None:
        if version != self.loaded:
            missing = set(weights) - set(self.names)
            if missing:
                raise RuntimeError(f"async rollouts: the snapshot has parameters the rollout copy lacks: {sorted(missing)[:3]}")
            self.model.load_state_dict(weights, strict=False)
            self.loaded = version
            self.engine.clear_graphs()

    def _newest(self) -> int:
        """Partial rollouts, between two segments: move to the newest published weights."""
        with self.lock:
            latest = self.latest
        if latest is not None and latest[0] > self.loaded:
            self.load(*latest)
        return self.loaded

    def generate(self, prompts, columns, sample_ids, params) -> RolloutBatch:
        if self.partial:
            from align.rollouts.partial import generate_partial

            return generate_partial(self.engine, prompts, params, self.chunk, self.loaded, self._newest,
                                    sample_ids=sample_ids, columns=columns)
        batch = self.engine.generate(prompts, params, sample_ids=sample_ids, columns=columns)
        batch.weights_version = self.loaded
        batch.versions = torch.full((len(batch),), self.loaded, dtype=torch.long)
        return batch

    def score(self, batch):
        from align.backends.local import score_batch

        return score_batch(self.reward, batch)

    def sync(self, version: int) -> None:  # the weights are loaded per job (`load`)
        pass


class _RayRolloutSide:
    """The Ray backend's rollout actors; the trainer's weight push waits for the generation in flight."""

    def __init__(self, backend):
        self.backend = backend

    def generate(self, prompts, columns, sample_ids, params) -> RolloutBatch:
        batch = self.backend.generate(prompts, columns, sample_ids, params)
        batch.versions = torch.full((len(batch),), batch.weights_version, dtype=torch.long)
        return batch

    def score(self, batch):
        return self.backend.score(batch)

    def sync(self, version: int) -> None:
        pass


class AsyncRollouts:
    """The queue of jobs and its background worker; `take()` replaces the generate and score phases."""

    def __init__(self, trainer):
        check_async_supported(trainer)
        cfg = trainer.cfg
        if cfg.algo.rollout_correction.mode == "none" and not cfg.rollout.use_rollout_logprobs:
            warnings.warn(f"train.max_staleness = {cfg.train.max_staleness} without a rollout correction: samples drawn "
                          "by older weights are trained as if on-policy (the demo's k = 1 run lost 0.29 accuracy so); set "
                          "algo.rollout_correction.mode: token_tis (docs/async.md)", UserWarning, stacklevel=3)
        self.trainer = trainer
        self.k = trainer.cfg.train.max_staleness
        self.local = trainer.cfg.cluster.backend != "ray"
        self.jobs: list[_Job] = []  # submitted, not yet taken (in step order)
        self.next_index: int | None = None  # the step the next submitted job is for
        self.side = None
        self.view = None
        self.thread: threading.Thread | None = None
        self.inbox: list[_Job] = []
        self.cv = threading.Condition()
        self.closed = False
        self.generator_idle = 0.0
        dev = torch.device(trainer.device)
        # CUDA: the worker's kernels go to their own stream so they can run beside the trainer's (untested on GPU)
        self.stream = torch.cuda.Stream(dev) if dev.type == "cuda" and self.local else None

    # ------------------------------------------------------------------------------------------ worker
    def _start(self) -> None:
        t = self.trainer
        self.side = _LocalRolloutSide(t) if self.local else _RayRolloutSide(t.backend)
        self.view = copy.copy(t)  # shares every object; `step`, `backend`, `samples_seen` are its own
        self.view.backend = self.side
        if self.local:
            self._publish(t.step)
        if self.next_index is None:
            self.next_index = t.step
        self.thread = threading.Thread(target=self._run, name="align-async-rollouts", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            t0 = time.perf_counter()
            with self.cv:
                while not self.inbox and not self.closed:
                    self.cv.wait()
                if self.closed:
                    return
                job = self.inbox.pop(0)
            self.generator_idle += time.perf_counter() - t0
            self._do(job)

    def _do(self, job: _Job) -> None:
        if self.stream is None:
            return self._do_job(job)
        with torch.cuda.stream(self.stream):
            self._do_job(job)

    def _do_job(self, job: _Job) -> None:
        view = self.view
        try:
            # partial rollouts start from the newest weights, which may be past the job's
            if self.local and not (self.side.partial and self.side.loaded >= job.version):
                self.side.load(job.version, job.weights)
            if self.local and self.side.partial:
                job.version = self.side._newest()
            view.step, job.seen = job.version, view.samples_seen
            t0 = time.perf_counter()
            step, metrics = RolloutPhases.phase_generate(view)
            gen_s = time.perf_counter() - t0
            job.generated.set()
            t1 = time.perf_counter()
            metrics |= RolloutPhases.phase_score(view, step)
            metrics |= {"async/generate_s": gen_s, "async/score_s": time.perf_counter() - t1}
            if self.stream is not None:  # the trainer reads the batch on its stream
                self.stream.synchronize()
            job.result = (step, metrics)
        except BaseException as err:  # noqa: BLE001 - re-raised in the trainer's thread by take()
            job.error = err
        finally:
            job.weights = None
            job.generated.set()
            job.done.set()

    def _publish(self, version: int) -> None:
        # only what the optimizer changes (LoRA: the adapters); frozen weights are the copy's own
        state = {k: p.detach().clone() for k, p in self.trainer.models.policy.named_parameters() if p.requires_grad}
        if self.stream is not None:  # the worker reads the snapshot on its own stream
            torch.cuda.current_stream(self.stream.device).synchronize()
        with self.side.lock:
            self.side.latest = (version, state)

    def _submit(self, index: int) -> None:
        t = self.trainer
        job = _Job(index=index, version=t.step)
        if self.local:
            version, job.weights = self.side.latest
            if version != t.step:
                raise RuntimeError(f"async rollouts: published weights are version {version}, the trainer's {t.step}")
        self.jobs.append(job)
        with self.cv:
            self.inbox.append(job)
            self.cv.notify()

    def _wait(self, event: threading.Event) -> None:
        while not event.wait(1.0):
            if self.thread is None or not self.thread.is_alive():
                raise RuntimeError("the async rollout worker stopped without finishing a job")

    # ------------------------------------------------------------------------------------------ trainer side
    def take(self) -> tuple[StepData, dict[str, float]]:
        """The generate and score phases of the step being trained: its job's result, after submitting the
        jobs up to k steps ahead with the current weights and applying the drop rule."""
        t = self.trainer
        if self.thread is None:
            self._start()
        n = t.step
        last = t.cfg.train.steps - 1  # no job for a step past the run's end
        while self.next_index <= min(n + self.k, last) or self.next_index <= n:
            self._submit(self.next_index)
            self.next_index += 1
        depth = sum(j.done.is_set() for j in self.jobs)
        job = self.jobs[0]
        if job.index != n:
            raise RuntimeError(f"async rollouts: the queue holds the batch of step {job.index}, the trainer is at {n}")
        t0 = time.perf_counter()
        self._wait(job.done)
        idle = time.perf_counter() - t0
        self.jobs.pop(0)
        if job.error is not None:
            raise job.error
        step, metrics = job.result
        dropped = self._drop_stale(step, job, n)
        if dropped:
            step = dropped[0]
        metrics = {k: v for k, v in metrics.items()}
        versions = step.batch.versions
        age = (n - versions).clamp(min=0)
        metrics |= {"async/staleness_mean": float(age.float().mean()), "async/staleness_max": float(age.max()),
                    **{f"async/staleness_{v}": float((age == v).sum()) for v in range(self.k + 1)},
                    "async/dropped": float(dropped[1] if dropped else 0), "async/queue_depth": float(depth),
                    "async/in_flight": float(len(self.jobs)), "async/trainer_idle_s": idle,
                    "async/generator_idle_s": self.generator_idle}
        self.generator_idle = 0.0
        return step, metrics

    def _drop_stale(self, step: StepData, job: _Job, n: int) -> tuple[StepData, int] | None:
        """Groups with a sample older than k versions: regenerated and rescored with the current weights."""
        g = self.trainer.algo.group_size
        stale = step.batch.versions < n - self.k
        if not bool(stale.any()):
            return None
        groups = stale.view(-1, g).any(-1)
        bad = (groups.nonzero().flatten()[:, None] * g + torch.arange(g)).flatten()
        good = (~groups).nonzero().flatten()
        good = (good[:, None] * g + torch.arange(g)).flatten()
        for j in list(self.jobs):  # the worker shares the rollout side: let it finish first
            self._wait(j.done)
        b = step.batch
        columns = {k: [v[i] for i in bad.tolist()] for k, v in b.columns.items() if k != TRAINER_STATE}
        ids = torch.arange(job.seen, job.seen + len(b))[bad]
        if self.local:
            self._publish_now()
        fresh = self.side.generate([b.prompts[i] for i in bad.tolist()], columns, ids, self.trainer.params)
        fresh = StepData(batch=fresh.to(self.trainer.device))
        self.view.step = n
        RolloutPhases.phase_score(self.view, fresh)
        parts = ([(step, good.to(step.scores.device))] if good.numel() else []) + \
            [(fresh, torch.arange(len(fresh.batch), device=fresh.scores.device))]
        return self.trainer._join_rows(parts), int(bad.numel())

    def _publish_now(self) -> None:
        t = self.trainer
        if self.side.latest is None or self.side.latest[0] != t.step:
            self._publish(t.step)
        self.side.load(*self.side.latest)

    def sync(self, version: int) -> dict[str, float]:
        """phase_sync: the version boundary. Ray: the push waits for the generation in flight; local: publish."""
        t = self.trainer
        t0 = time.perf_counter()
        if not self.local:
            for j in self.jobs:
                self._wait(j.generated)
        wait = time.perf_counter() - t0
        t.backend.sync(version)
        if self.local and self.side is not None:
            self._publish(version)
        return {"async/sync_wait_s": wait}

    # ------------------------------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """The queued batches (jobs in flight are finished first): a resume trains on them, exactly."""
        for j in self.jobs:
            self._wait(j.done)
            if j.error is not None:
                raise j.error
        if self.view is not None:  # the data cursor (shared sampler) is the newest queued job's: so are the ids
            self.trainer.samples_seen = self.view.samples_seen
        return {"next_index": self.next_index, "jobs": [_job_state(j) for j in self.jobs]}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        self.next_index = state["next_index"]
        for js in state["jobs"]:
            job = _Job(index=js["index"], version=js["version"], seen=js["seen"])
            job.result = (_stepdata_from(js["step"]), dict(js["metrics"]))
            job.generated.set()
            job.done.set()
            self.jobs.append(job)

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=60)


def _job_state(job: _Job) -> dict[str, Any]:
    step, metrics = job.result
    batch = {f.name: getattr(step.batch, f.name) for f in fields(step.batch)}
    batch["columns"] = {k: v for k, v in batch["columns"].items() if k != TRAINER_STATE}
    plain = {f.name: getattr(step, f.name) for f in fields(step) if f.name != "batch"}
    return {"index": job.index, "version": job.version, "seen": job.seen, "metrics": dict(metrics),
            "step": {"batch": batch, **plain}}


def _stepdata_from(state: dict[str, Any]) -> StepData:
    state = dict(state)
    return StepData(batch=RolloutBatch(**state.pop("batch")), **state)
