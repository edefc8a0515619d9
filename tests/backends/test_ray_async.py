"""train.max_staleness: 1 on the Ray backend (rollout actors generate the next batch while the trainer trains)
against the local backend's k = 1 run: the schedule is the same, so metrics and weights are the same."""
from __future__ import annotations

import sys

import pytest
import torch

import align

ray = pytest.importorskip("ray")
from ray import cloudpickle  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]  # ~45 s on a loaded 2-core machine
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class MeanCode:
    __name__ = "mean_code"

    def __call__(self, prompts, completions, **kwargs):
        return [sum(map(ord, s)) / (128.0 * len(s)) if s else 0.0 for s in completions]


def config(model, data, run_dir, backend):
    return {
        "algorithm": "grpo", "model": {"path": str(model)}, "data": {"path": str(data)},
        "reward": {"functions": [MeanCode()]}, "algo": {"group_size": 2},
        "rollout": {"max_new_tokens": 5, "temperature": 1.0, "micro_batch_size": 2},
        "train": {"steps": 3, "prompts_per_step": 4, "micro_batch_size": 4, "lr": 1e-2, "seed": 3, "max_staleness": 1},
        "cluster": {"backend": backend, "num_rollout_workers": 2, "num_reward_workers": 1, "rollout_num_cpus": 1,
                    "reward_num_cpus": 0.5},
        "logging": {"run_dir": str(run_dir), "progress": False, "print_every": 0},
        "checkpoint": {"save_final": False},
    }


def test_ray_k1_matches_local_k1(tiny_model_path, arithmetic_data, tmp_path):
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
    try:
        runs = {}
        for backend in ("local", "ray"):
            t = align.Trainer(config(tiny_model_path, arithmetic_data["prompts"], tmp_path / backend, backend))
            try:
                hist = t.train().history
                runs[backend] = (hist, {k: v.detach().clone() for k, v in t.models.policy.state_dict().items()})
            finally:
                t.close()
    finally:
        ray.shutdown()
    (hl, wl), (hr, wr) = runs["local"], runs["ray"]
    for a, b in zip(hl, hr):
        for k in ("reward/mean", "loss/policy", "train/grad_norm", "async/staleness_mean", "async/staleness_max"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k)
    assert [h["async/staleness_1"] for h in hr] == [0, 8, 8]
    for k in wl:
        assert torch.allclose(wl[k], wr[k], atol=1e-6), k
