"""`cluster.backend: ray` against the in-process backend: same metrics, same weights, faults handled.

One local Ray instance serves the module. Rollout actors are kept warm between the runs of this module
(`cluster.keep_workers` in every config here; the full weights are pushed on every reuse) so the module starts
few processes.
"""
from __future__ import annotations

import os
import sys
import threading
import time

import pytest
import torch

import align

ray = pytest.importorskip("ray")
from _ray_local import local_ray  # noqa: E402
from ray import cloudpickle  # noqa: E402  (Ray ships actor arguments with its own cloudpickle)

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

# The reward classes below live in this test module, which Ray workers cannot import: ship them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def mean_code(text: str) -> float:
    """The reference reward, written out: mean character code / 128 (0 for an empty completion)."""
    return sum(ord(c) for c in text) / (128.0 * len(text)) if text else 0.0


class MeanCode:
    """A dense reward: any change of a sampled token changes the score."""

    __name__ = "mean_code"

    def __call__(self, prompts, completions, **kwargs):
        assert len(kwargs["completion_ids"]) == len(completions) and len(kwargs["answer"]) == len(completions)
        return [mean_code(s) for s in completions]


class Controlled(MeanCode):
    """MeanCode steered by files in `ctl`: the call that claims `hang` writes its pid to `started` and sleeps
    for the number of seconds in the file; the call that claims `raise` raises. Every call appends to `calls`."""

    def __init__(self, ctl):
        self.ctl = str(ctl)

    def _claim(self, name):
        path = os.path.join(self.ctl, name)
        try:
            seconds = float(open(path).read() or 0)
            os.remove(path)
            return seconds
        except (FileNotFoundError, ValueError):
            return None

    def __call__(self, prompts, completions, **kwargs):
        with open(os.path.join(self.ctl, "calls"), "a") as f:
            f.write(f"{len(completions)}\n")
        if self._claim("raise") is not None:
            raise RuntimeError("injected reward failure")
        seconds = self._claim("hang")
        if seconds is not None:
            with open(os.path.join(self.ctl, "started"), "w") as f:
                f.write(str(os.getpid()))
            time.sleep(seconds)
        return super().__call__(prompts, completions, **kwargs)


@pytest.fixture(scope="module")
def ray_local():
    yield from local_ray(num_cpus=8)


def config(algorithm, model, data, run_dir, reward, backend="local", workers=1, steps=2, **cluster):
    cfg = {
        "algorithm": algorithm,
        "model": {"path": str(model)},
        "data": {"path": str(data)},
        "reward": {"functions": [reward]},
        "rollout": {"max_new_tokens": 6, "temperature": 1.0, "micro_batch_size": 2},  # pipelining: 2-sample shards
        "train": {"steps": steps, "prompts_per_step": 4, "micro_batch_size": 4, "lr": 1e-2, "seed": 3},
        "cluster": {"backend": backend, "num_rollout_workers": workers, "num_reward_workers": 2,
                    "rollout_num_cpus": 1, "reward_num_cpus": 0.5, "keep_workers": True, **cluster},
        "logging": {"run_dir": str(run_dir), "progress": False, "print_every": 0},
        "checkpoint": {"save_final": False},
    }
    if algorithm == "grpo":
        cfg["algo"] = {"group_size": 2, "kl_coef": 0.02}
    if algorithm == "grpo-lora":  # GRPO with LoRA: the sync after each step sends the adapters only
        cfg["algorithm"] = "grpo"
        cfg["algo"] = {"group_size": 2, "kl_coef": 0.02}
        cfg["model"]["lora"] = {"enabled": True, "r": 4}
    else:
        cfg["algo"] = {"kl_coef": 0.05, "epochs": 2}
        cfg["train"]["mini_batch_size"] = 2
    return cfg


def assert_same_metrics(reference, other, what):
    assert len(reference) == len(other)
    for a, b in zip(reference, other):
        keys = [k for k in a if not k.startswith("time/") and k != "rollout/tokens_per_s"]
        assert set(keys) <= set(b), (what, set(keys) - set(b))
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (what, a["step"], k, a[k], b[k])


def assert_workers_hold_trainer_weights(trainer):
    trainer_state = trainer.models.policy.state_dict()
    for state in trainer.backend.worker_state_dicts():
        assert state.keys() == trainer_state.keys()
        for k, v in trainer_state.items():
            assert torch.equal(state[k], v.cpu()), k  # bitwise, not approximately


@pytest.mark.parametrize("algorithm", ["grpo-lora", "ppo"])
def test_ray_runs_match_local(algorithm, ray_local, tiny_model_path, arithmetic_data, tmp_path):
    """Same seed: local, ray with 1 and with 2 rollout workers give the same metrics; afterwards every
    worker holds exactly the trainer's weights. GRPO runs with LoRA (adapter-only syncs), PPO with full
    weights (object store with 1 worker, torch.distributed broadcast with 2); plain GRPO is in the fault test."""
    data = arithmetic_data["prompts"]
    local = align.train(config(algorithm, tiny_model_path, data, tmp_path / "local", MeanCode()))
    assert local.history[-1]["reward/std"] > 0  # the dense reward is not degenerate
    for workers in (1, 2):
        # PPO with 2 workers syncs by torch.distributed broadcast (gloo here; NCCL on GPUs), the rest through
        # the object store
        sync = "collective" if (algorithm, workers) == ("ppo", 2) else "object_store"
        trainer = align.Trainer(config(algorithm, tiny_model_path, data, tmp_path / f"ray{workers}", MeanCode(),
                                       backend="ray", workers=workers, weight_sync=sync))
        try:
            result = trainer.train()
            assert_same_metrics(local.history, result.history, f"{algorithm} ray x{workers} {sync}")
            assert_workers_hold_trainer_weights(trainer)
            assert trainer.backend.remote_reward and len(trainer.backend.rollout_actors) == workers
            assert trainer.backend.stats["weight_broadcasts"] == (2 if sync == "collective" else 0)
            assert trainer.models.lora == (algorithm == "grpo-lora")
        finally:
            trainer.close()


def _pids(backend):
    return {ray.get(a.health.remote(), timeout=60)["pid"]: a for a in backend.reward_actors}


def _kill_when_started(ctl, actors_by_pid, no_restart):
    def run():
        started = ctl / "started"
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.1)
        pid = int(started.read_text())
        started.unlink()
        ray.kill(actors_by_pid[pid], no_restart=no_restart)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_faults_leave_scores_correct_or_explicit(ray_local, tiny_model_path, arithmetic_data, tmp_path):
    """Killed reward workers (restarted by Ray, or dead for good and replaced) still give the local run's
    scores; a raising reward and a hung one give explicit per-sample errors; a restarted rollout worker gets
    the weights again before it samples. The run continues throughout."""
    data = arithmetic_data["prompts"]
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    local = align.train(config("grpo", tiny_model_path, data, tmp_path / "local", MeanCode(), steps=4))
    trainer = align.Trainer(config("grpo", tiny_model_path, data, tmp_path / "ray", Controlled(ctl),
                                   backend="ray", workers=1, steps=4))
    backend = trainer.backend
    history = []
    try:
        # step 1: a reward worker is killed mid-score; Ray restarts it and retries the task
        (ctl / "hang").write_text("30")
        killer = _kill_when_started(ctl, _pids(backend), no_restart=False)
        history.append({"step": 1, **trainer.train_step()})
        killer.join(5)
        calls = len((ctl / "calls").read_text().split())
        assert calls > 4, calls  # 4 shards, and the killed worker's task(s) ran again

        # step 2: killed for good; the backend replaces the worker and re-sends its shards
        (ctl / "hang").write_text("30")
        killer = _kill_when_started(ctl, _pids(backend), no_restart=True)
        history.append({"step": 2, **trainer.train_step()})
        killer.join(5)
        assert backend.stats["reward_replacements"] == 1 and backend.stats["score_retries"] >= 1

        # a reward that raises: that shard's samples are explicit errors, the others are scored
        params = trainer.params
        prompts = [f"{i}+{i}=" for i in range(8)]
        columns = {"answer": [str(2 * i) for i in range(8)]}
        ids = torch.arange(10_000, 10_008)
        (ctl / "raise").write_text("1")
        batch = backend.generate(prompts, columns, ids, params)
        out = backend.score(batch)
        failed = [i for i, e in enumerate(out.errors) if e is not None]
        assert len(failed) == 2 and all("injected reward failure" in out.errors[i] for i in failed)
        for i, text in enumerate(batch.completions):
            assert out.scores[i] == (None if i in failed else pytest.approx(mean_code(text), abs=1e-12))

        # a hung reward is bounded by the timeout: explicit errors, the worker is replaced
        backend.score_timeout_s = 3.0
        (ctl / "hang").write_text("120")
        t0 = time.monotonic()
        batch = backend.generate(prompts, columns, ids + 8, params)
        out = backend.score(batch)
        assert time.monotonic() - t0 < 60
        timed_out = [i for i, e in enumerate(out.errors) if e is not None]
        assert timed_out and all("timed out" in out.errors[i] for i in timed_out)
        assert all(out.scores[i] is None for i in timed_out)
        assert all(out.scores[i] == pytest.approx(mean_code(t)) for i, t in enumerate(batch.completions) if i not in timed_out)
        assert backend.stats["score_timeouts"] >= 1
        backend.score_timeout_s = 600.0

        # step 3 runs normally on the replaced workers
        history.append({"step": 3, **trainer.train_step()})

        # step 4: the rollout worker is killed and restarted by Ray: it lost its weights, so it refuses to
        # sample until the backend pushes them again
        ray.kill(backend.rollout_actors[0], no_restart=False)
        history.append({"step": 4, **trainer.train_step()})
        assert backend.stats["resyncs"] >= 1
        assert_workers_hold_trainer_weights(trainer)
    finally:
        trainer.close()
    assert [h["reward/errors"] for h in history] == [0.0] * 4
    assert_same_metrics(local.history, history, "faults")
