"""F9 (GPU readiness review): a separately trained critic keeps fp32 master weights whatever the policy's
dtype, and fp16 training (no GradScaler) is refused with one line. (The dtype table is in test_precision.py.)"""
from __future__ import annotations

import pytest
import torch

from align.config import ModelConfig
from align.errors import ConfigError
from align.models import load_models

F32, BF16 = torch.float32, torch.bfloat16
CPU = torch.device("cpu")


def test_fp16_training_is_refused_with_one_line():
    with pytest.raises(ConfigError, match="GradScaler") as err:
        ModelConfig(path="x", dtype="float16")
    assert "\n" not in str(err.value)


def test_default_dtype_is_auto():
    assert ModelConfig(path="x").dtype == "auto"


def test_separate_critic_loads_fp32_masters_with_a_bf16_policy(tiny_model_path):
    """F9: with a bf16 policy (LoRA's frozen base) the separately trained critic used to load in bf16 too, and
    AdamW then updated bf16 weights with no master copy. Its backbone must be fp32 and fully trainable."""
    cfg = ModelConfig(path=str(tiny_model_path), dtype="bfloat16", critic="separate")
    cfg.lora.enabled = True
    m = load_models(cfg, CPU, need_reference=False, critic="separate")
    base = {p.dtype for n, p in m.policy.named_parameters() if "lora_" not in n}
    assert base == {BF16} and {p.dtype for p in m.trainable_parameters()} == {F32}  # peft keeps adapters fp32
    assert {p.dtype for p in m.critic.parameters()} == {F32}
    assert all(p.requires_grad for p in m.critic.parameters())
    assert {p.dtype for p in m.critic_parameters()} == {F32}
