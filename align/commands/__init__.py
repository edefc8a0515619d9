"""Sub-commands of the `align` CLI (see align/cli.py), and config validation shared by them."""
from __future__ import annotations

from pathlib import Path


def validate_any_config(path: str | Path):
    """Load and validate any config file the CLI accepts: a run (PPO/GRPO, `algorithm:` key), an SFT config
    (`output_dir:` key, no `algorithm:`), or a reward-model config (`kind:` under `model:` plus `train_rm`)."""
    from align.config import load_config, read_config_file
    from align.errors import ConfigError

    data = read_config_file(path)
    if "algorithm" in data:
        return load_config(path)
    if "output_dir" in data and "rm" not in data:
        from align.sft import load_sft_config

        return load_sft_config(path)
    try:
        from rewards.training import load_rm_config
    except ImportError:
        raise ConfigError(f"{path}: not a run config (no `algorithm:`) nor an SFT config (no `output_dir:`)") from None
    return load_rm_config(path)
