"""Ray: 2 trainer actors reproduce the torchrun 2-rank run (issue 17 acceptance): same config and seed, 3 GRPO
steps on a tiny model, per-step metrics within 1e-5 relative and final weights within 1e-5 max abs (fp32).

The reference is a real `torchrun --nproc_per_node 2 -m align.cli train` subprocess; the other run is
`align.train` with `cluster.backend: ray, num_trainer_workers: 2` (rollouts colocated on the ranks)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

REWARD_MODULE = '''
def mean_code(prompts, completions, **kwargs):
    """Mean character code / 128: a dense reward (any changed token changes the score)."""
    return [sum(map(ord, s)) / (128.0 * len(s)) if s else 0.0 for s in completions]
'''


def _config(model, data, run_dir):
    return {"algorithm": "grpo", "model": {"path": str(model)}, "data": {"path": str(data)},
            "reward": {"functions": ["ray_repro_reward:mean_code"]},
            "algo": {"group_size": 2, "kl_coef": 0.02},
            "rollout": {"max_new_tokens": 6, "temperature": 1.0, "micro_batch_size": 2},
            "train": {"steps": 3, "prompts_per_step": 4, "micro_batch_size": 2, "lr": 1e-2, "seed": 3, "device": "cpu"},
            "logging": {"run_dir": str(run_dir), "progress": False, "print_every": 0},
            "checkpoint": {"save_final": True}}


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from align import checkpoint as ckpt_io

    model = AutoModelForCausalLM.from_pretrained(ckpt_io.model_dir(ckpt_io.find_checkpoint(run_dir)), dtype=torch.float32)
    return {k: v.detach() for k, v in model.state_dict().items()}


def _compared(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not k.startswith(("time/", "backend/"))
            and k not in ("rollout/tokens_per_s", "step")}


def test_two_ray_trainer_actors_reproduce_torchrun_two_ranks(tiny_model_path, arithmetic_data, tmp_path):
    (tmp_path / "ray_repro_reward.py").write_text(REWARD_MODULE)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    env.pop("WORLD_SIZE", None)

    # the reference: torchrun, 2 ranks
    cfg_path = tmp_path / "torchrun.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(tiny_model_path, arithmetic_data["prompts"], tmp_path / "torchrun")))
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "align.cli", "train", str(cfg_path)],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = [json.loads(line) for line in (tmp_path / "torchrun" / "metrics.jsonl").read_text().splitlines()]

    # the same config on 2 Ray trainer actors
    sys.path.insert(0, str(tmp_path))
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {k: env[k] for k in ("OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE",
                                                           "PYTHONPATH")}})
    try:
        import align

        cfg = _config(tiny_model_path, arithmetic_data["prompts"], tmp_path / "ray")
        cfg["cluster"] = {"backend": "ray", "num_trainer_workers": 2, "trainer_num_cpus": 1}
        result = align.train(cfg)
    finally:
        ray.shutdown()
        sys.path.remove(str(tmp_path))

    assert [h["step"] for h in result.history] == [r["step"] for r in reference] == [1, 2, 3]
    assert result.history[-1]["reward/std"] > 0  # the dense reward is not degenerate
    for ref, got in zip(reference, result.history):
        ref, got = _compared(ref), _compared(got)
        assert set(ref) <= set(got), set(ref) - set(got)
        for k, v in ref.items():
            assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-7), (ref.get("step"), k, v, got[k])
    assert result.checkpoint is not None and Path(result.checkpoint).is_relative_to(tmp_path / "ray")
    want, have = _final_weights(tmp_path / "torchrun"), _final_weights(tmp_path / "ray")
    assert want.keys() == have.keys()
    for k in want:
        assert (want[k] - have[k]).abs().max().item() <= 1e-5, k
