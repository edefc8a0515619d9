"""Sub-commands of the `align` CLI (see align/cli.py), and config validation shared by them."""
from __future__ import annotations

from pathlib import Path


def validate_any_config(path: str | Path):
    """Load and validate any config file the CLI accepts: a run (PPO/GRPO, `algorithm:` key), an SFT config,
    or a reward-model config (`model.kind: classifier | themis`)."""
    from align.command_configs import load_rm_config
    from align.config import load_config, read_config_file

    data = read_config_file(path)
    if "algorithm" in data:
        return load_config(path)
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    if model.get("kind") not in ("classifier", "themis"):
        from align.supervised import load_sft_config

        return load_sft_config(path)
    return load_rm_config(path)
