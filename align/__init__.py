"""align: RLHF with PPO and GRPO, fused Triton sampling, tool-augmented (Themis), curiosity (CD-RLHF) and
understanding-driven multimodal (GvU) rewards.

    import align
    result = align.train("examples/configs/grpo.yaml")        # or a GRPOConfig / PPOConfig / dict
"""
from __future__ import annotations

from typing import Any

from align import algos
from align.config import GRPOConfig, PPOConfig, load_config
from align.errors import CheckpointError, ConfigError, UserError

__version__ = "0.1.0"

_LAZY = {
    "train": ("align.trainer.loop", "train"),
    "Trainer": ("align.trainer.loop", "Trainer"),
    "TrainResult": ("align.trainer.loop", "TrainResult"),
    "sft": ("align.supervised", "sft"),
    "SFTConfig": ("align.supervised", "SFTConfig"),
    "metrics": ("align.metrics", None),
}

__all__ = ["GRPOConfig", "PPOConfig", "load_config", "algos", "ConfigError", "UserError", "CheckpointError",
           *_LAZY]


def __getattr__(name: str) -> Any:
    # the trainer pulls transformers/peft: import it on first use so `import align` stays light
    if name not in _LAZY:
        raise AttributeError(f"module 'align' has no attribute {name!r}")
    import importlib

    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value
