"""CD-RLHF inside the PPO trainer: eta = 0 is plain PPO bit for bit; eta > 0 logs curiosity and resumes exactly."""
from __future__ import annotations

import pytest
import torch

import align
from align.testing import CharFraction


def ppo(model, data, run_dir, curiosity, steps=2, save_final=False):
    return {
        "algorithm": "ppo",
        "model": {"path": str(model)},
        "data": {"path": str(data)},
        "reward": {"functions": [CharFraction()], "curiosity": curiosity},
        "rollout": {"max_new_tokens": 5, "temperature": 1.0},
        "algo": {"kl_coef": 0.05, "epochs": 1},
        "train": {"steps": steps, "prompts_per_step": 4, "micro_batch_size": 4, "lr": 3e-3, "seed": 0},
        "logging": {"run_dir": str(run_dir), "progress": False, "print_every": 0},
        "checkpoint": {"save_final": save_final},
    }


def _comparable(history):
    return [{k: v for k, v in h.items() if not k.startswith("time/") and k != "rollout/tokens_per_s"} for h in history]


def test_eta_zero_is_plain_ppo_bit_for_bit(tiny_model_path, arithmetic_data, tmp_path):
    results = {}
    for name, curiosity in (("plain", None), ("eta0", {"eta": 0.0, "top_k": 1})):
        trainer = align.Trainer(ppo(tiny_model_path, arithmetic_data["prompts"], tmp_path / name, curiosity))
        result = trainer.train()
        results[name] = (result.history, {k: v.detach().clone() for k, v in trainer.models.policy.named_parameters()})
        trainer.close()
    (h_plain, w_plain), (h_eta0, w_eta0) = results["plain"], results["eta0"]
    assert _comparable(h_plain) == _comparable(h_eta0)  # exact float equality of every logged number
    assert all(torch.equal(w_plain[k], w_eta0[k]) for k in w_plain)
    assert not any(k.startswith("curiosity/") for k in h_eta0[0])


def test_curiosity_logs_metrics_and_resumes_exactly(tiny_model_path, arithmetic_data, tmp_path):
    cur = {"eta": 0.5, "top_k": 1, "lr": 1e-3}
    full = align.Trainer(ppo(tiny_model_path, arithmetic_data["prompts"], tmp_path / "full", cur))
    full_result = full.train()
    h = full_result.history
    for key in ("curiosity/gate_rate", "curiosity/intrinsic_mean", "curiosity/icm_loss"):
        assert key in h[0] and h[0][key] == h[0][key]
    assert 0.0 < h[0]["curiosity/gate_rate"] <= 1.0
    assert full.curiosity.num_updates == 2

    part_cfg = ppo(tiny_model_path, arithmetic_data["prompts"], tmp_path / "part", cur, save_final=True)
    first = align.Trainer(part_cfg)
    first_result = first.train(max_steps=1)
    first.close()
    second = align.Trainer(part_cfg, resume_from=tmp_path / "part")
    second_result = second.train()
    resumed = _comparable(first_result.history + second_result.history)
    for a, b in zip(_comparable(h), resumed):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    icm_full, icm_resumed = full.curiosity.icm.state_dict(), second.curiosity.icm.state_dict()
    assert all(torch.allclose(icm_full[k], icm_resumed[k], rtol=1e-5, atol=1e-7) for k in icm_full)
    assert second.curiosity.num_updates == 2
    full.close()
    second.close()
