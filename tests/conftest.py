"""Shared fixtures: a tiny random model saved to disk (loaded like a real checkpoint) and toy data."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (trl and peft do)

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))  # examples/*.py helpers (arithmetic task) are importable in tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    from align.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen_path(tmp_path_factory) -> Path:
    from align.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", arch="qwen2", seed=1)


@pytest.fixture(scope="session")
def arithmetic_data(tmp_path_factory) -> dict[str, Path]:
    from arithmetic import write_arithmetic_data

    return write_arithmetic_data(tmp_path_factory.mktemp("data"), n_rl=64, n_sft=64)
