"""RolloutWorker in-process (no Ray): versioned weights, bitwise sync (full and LoRA adapters only), and
sampling that matches the trainer's own engine whatever the sharding."""
from __future__ import annotations

import pytest
import torch

from align.backends.ray import concat_outputs, shard_bounds
from align.config import ModelConfig
from align.models import load_models
from align.rewards.base import RewardOutput
from align.rollouts.engine import RolloutEngine
from align.rollouts.params import SamplingParams
from align.rollouts.worker import ModelSpec, RolloutWorker, StaleWeightsError

PROMPTS = ["1+2=", "3+4=", "10+20=", "7+8=", "5+5=", "9+0="]
PARAMS = SamplingParams(max_new_tokens=5, temperature=1.0, top_k=20, seed=11)


def perturb(module, seed, only=None):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if only is None or only in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def assert_bitwise(worker_state, trainer_state):
    assert worker_state.keys() == trainer_state.keys()
    for k, v in trainer_state.items():
        assert torch.equal(worker_state[k], v), k


def trainer_side(path, lora=False):
    cfg = ModelConfig(path=str(path), lora={"enabled": lora, "r": 4})
    return load_models(cfg, torch.device("cpu"), need_reference=False, critic=None)


def spec_of(models, path):
    base = models.policy.get_base_model() if models.lora else models.policy
    return ModelSpec(path=str(path), config=base.config, dtype=torch.float32,
                     lora=models.policy.peft_config["default"] if models.lora else None)


def test_full_sync_is_bitwise_and_samples_like_the_engine(tiny_model_path):
    models = trainer_side(tiny_model_path)
    perturb(models.policy, 0)  # the trainer's weights are no longer the checkpoint's
    # path "" : the worker builds from the config alone (random init), as on a node without the checkpoint
    worker = RolloutWorker(spec_of(models, ""), models.tokenizer, {"micro_batch_size": 4})
    ids = torch.arange(40, 40 + len(PROMPTS))
    with pytest.raises(StaleWeightsError, match="version -1"):
        worker.generate(PROMPTS, {}, ids, PARAMS, expected_version=0)
    assert worker.load_weights(models.policy.state_dict(), version=0) == 0
    assert_bitwise(worker.state_dict(), models.policy.state_dict())

    reference = RolloutEngine(models.policy, models.tokenizer, micro_batch_size=64, counter_noise=True)
    ref = reference.generate(PROMPTS, PARAMS, sample_ids=ids)
    whole, payload = worker.generate(PROMPTS, {"answer": list("abcdef")}, ids, PARAMS, expected_version=0)
    assert torch.equal(whole.response_ids, ref.response_ids) and torch.equal(whole.mask, ref.mask)
    torch.testing.assert_close(whole.logprobs, ref.logprobs, rtol=0, atol=1e-5)
    assert whole.weights_version == 0
    assert payload["sample_ids"] == ids.tolist() and payload["completions"] == ref.completions
    assert payload["columns"]["answer"] == list("abcdef")
    assert payload["columns"]["completion_ids"] == [r[m.bool()].tolist() for r, m in zip(ref.response_ids, ref.mask)]

    # two shards with their global ids draw exactly the tokens of the whole batch
    a, _ = worker.generate(PROMPTS[:2], {}, ids[:2], PARAMS, expected_version=0)
    b, _ = worker.generate(PROMPTS[2:], {}, ids[2:], PARAMS, expected_version=0)
    assert a.completions + b.completions == ref.completions

    perturb(models.policy, 1)
    with pytest.raises(StaleWeightsError):
        worker.generate(PROMPTS, {}, ids, PARAMS, expected_version=1)  # never samples with old weights silently
    worker.load_weights(models.policy.state_dict(), version=1)
    assert_bitwise(worker.state_dict(), models.policy.state_dict())


def test_lora_sync_sends_adapters_only_and_is_bitwise(tiny_model_path):
    models = trainer_side(tiny_model_path, lora=True)
    perturb(models.policy, 2, only="lora_")
    worker = RolloutWorker(spec_of(models, tiny_model_path), models.tokenizer)
    worker.load_weights(models.policy.state_dict(), version=0)
    assert_bitwise(worker.state_dict(), models.policy.state_dict())

    from peft import get_peft_model_state_dict

    perturb(models.policy, 3, only="lora_")  # an update changes only the adapters
    adapters = get_peft_model_state_dict(models.policy)
    assert adapters and all("lora_" in k for k in adapters)
    worker.load_weights(adapters, version=1, kind="adapters")
    assert_bitwise(worker.state_dict(), models.policy.state_dict())
    ids = torch.arange(len(PROMPTS))
    out, _ = worker.generate(PROMPTS, {}, ids, PARAMS, expected_version=1)
    ref = RolloutEngine(models.policy, models.tokenizer, counter_noise=True).generate(PROMPTS, PARAMS, sample_ids=ids)
    assert out.completions == ref.completions
    with pytest.raises(ValueError, match="kind"):
        worker.load_weights(adapters, version=2, kind="delta")


def test_shard_bounds_and_output_concat():
    assert shard_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert shard_bounds(2, 4) == [(0, 1), (1, 2)]  # never an empty shard
    assert shard_bounds(5, 1) == [(0, 5)]
    a = RewardOutput(scores=[1.0, None], errors=[None, "boom"], token_rewards=[[0.5], [0.0]])
    b = RewardOutput(scores=[None], errors=["reward scoring timed out after 3 s"])
    out = concat_outputs([a, b])
    assert out.scores == [1.0, None, None] and out.errors == [None, "boom", "reward scoring timed out after 3 s"]
    assert out.token_rewards == [[0.5], [0.0], []]


def test_config_build_skips_the_random_init_and_keeps_computed_buffers(monkeypatch):
    """GPU_READINESS F13: a worker without the checkpoint built the model from its config with a full random init
    (minutes for 7B on one CPU thread), thrown away when the trainer's weights arrive. Now no init runs; the
    rotary frequencies (a buffer computed in __init__, not in the state dict) must still be right."""
    from transformers import LlamaConfig, PreTrainedModel

    from align.rollouts.worker import build_policy

    calls = []
    original = PreTrainedModel._init_weights
    monkeypatch.setattr(PreTrainedModel, "_init_weights", lambda self, m: (calls.append(type(m).__name__), original(self, m)))
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, rope_theta=10000.0)
    model = build_policy(ModelSpec(path="", config=cfg), torch.device("cpu"))
    assert calls == []
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    expected = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    inv_freq = model.model.rotary_emb.inv_freq
    torch.testing.assert_close(inv_freq.double(), expected, rtol=1e-6, atol=0)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
