"""align: RLHF with PPO and GRPO, fused Triton sampling, tool-augmented (Themis), curiosity (CD-RLHF) and
understanding-driven multimodal (GvU) rewards.

    import align
    result = align.train("examples/configs/grpo.yaml")        # or a GRPOConfig / PPOConfig / dict

One import name: the top-level folders `kernels/`, `tools/`, `rewards/`, `rollouts/` install as
`align.kernels`, `align.tools`, `align.rewards`, `align.rollouts` (pyproject's `package-dir`).

Importing `align` (or `align.tools`, `align.kernels`, ...) loads nothing heavy: every name below is resolved on
first use, so the calculator child, the sandbox and the reward service do not pay for torch / transformers.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path
from typing import Any

__version__ = "0.2.0"

_SUBPACKAGE_FOLDERS = {"kernels": "kernels", "tools": "tools", "rewards": "rewards", "rollouts": "rollouts"}


class _SourceCheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds `align.kernels` & co. in a source checkout that was put on sys.path without being installed
    (`PYTHONPATH=/path/to/repo`). Installed copies (editable or not) are found before this finder is asked:
    it sits last on sys.meta_path and only answers when `align/` has the repo's pyproject.toml beside it, so a
    site-packages install never maps `align.kernels` to some other distribution's top-level `kernels`."""

    def __init__(self, repo: Path):
        self.repo = repo

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, name = fullname.partition(".")
        if prefix != "align" or name not in _SUBPACKAGE_FOLDERS:
            return None
        folder = self.repo / _SUBPACKAGE_FOLDERS[name]
        if not (folder / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def _install_source_checkout_finder() -> None:
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").is_file() and not any(isinstance(f, _SourceCheckoutFinder) for f in sys.meta_path):
        sys.meta_path.append(_SourceCheckoutFinder(repo))


_install_source_checkout_finder()

_LAZY = {
    # name: (module, attribute or None for the module itself)
    "algos": ("align.algos", None),
    "kernels": ("align.kernels", None),
    "tools": ("align.tools", None),
    "rewards": ("align.rewards", None),
    "rollouts": ("align.rollouts", None),
    "metrics": ("align.metrics", None),
    "GRPOConfig": ("align.config", "GRPOConfig"),
    "PPOConfig": ("align.config", "PPOConfig"),
    "load_config": ("align.config", "load_config"),
    "AlignError": ("align.errors", "AlignError"),
    "UserError": ("align.errors", "UserError"),
    "ConfigError": ("align.errors", "ConfigError"),
    "CheckpointError": ("align.errors", "CheckpointError"),
    "train": ("align.trainer.loop", "train"),
    "Trainer": ("align.trainer.loop", "Trainer"),
    "TrainResult": ("align.trainer.loop", "TrainResult"),
    "sft": ("align.supervised", "sft"),
    "SFTConfig": ("align.supervised", "SFTConfig"),
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    # resolved on first use, then cached in the module's globals
    if name not in _LAZY:
        raise AttributeError(f"module 'align' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
