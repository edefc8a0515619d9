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
# TARA data: $ALIGN_TARA_DIR (CI exports it); a checkout next to a shared/ folder (the development layout, e.g.
# `make test` in a worktree) finds it there too. The library itself never guesses this path.
_SHARED_TARA = REPO.parent / "shared" / "data" / "tara"
if not os.environ.get("ALIGN_TARA_DIR") and _SHARED_TARA.is_dir():
    os.environ["ALIGN_TARA_DIR"] = str(_SHARED_TARA)


def _tara_present() -> bool:
    from align.tools.data import optional_tara_dir

    root = optional_tara_dir()
    return root is not None and (root / "agent_calendar_test.json").is_file()


def pytest_collection_modifyitems(config, items):
    tara = _tara_present()
    skip_tara = pytest.mark.skip(reason="TARA data not found: set ALIGN_TARA_DIR=/path/to/tara")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "tara" in item.keywords and not tara:
            item.add_marker(skip_tara)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A `tara` test that skips while the TARA data is present fails: the data is there, so it must run."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and "tara" in item.keywords and _tara_present():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (f"TARA test skipped although the TARA data is present "
                           f"(ALIGN_TARA_DIR={os.environ.get('ALIGN_TARA_DIR')}): {reason}")


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


# GvU: a random toy UMM and a random Janus, built locally and saved/loaded back (tests/rollouts, rewards, trainer, examples).

@pytest.fixture(scope="session")
def toy_umm_path(tmp_path_factory):
    """A random 2-layer toy UMM (3x3 grid) saved with save_pretrained + its tokenizer."""
    import toyworld as tw  # examples/toyworld.py: the toy world's model and its pre-training data

    model, tokenizer = tw.build_toy_umm(grid_size=3, hidden_size=32, num_heads=2, seed=0)
    # A few optimiser steps so the scores are not the near-uniform output of a fresh init.
    tw.pretrain(model, tokenizer, steps=5, batch_size=16, lr=1e-2, seed=0)
    path = tmp_path_factory.mktemp("toy_umm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def toy_umm(toy_umm_path):
    from align.rollouts.umm import CausalLMUMM

    return CausalLMUMM.from_pretrained(toy_umm_path)


@pytest.fixture(scope="session")
def tiny_janus(tmp_path_factory):
    """(JanusForConditionalGeneration, tokenizer, ids) with 4 image tokens per image, random weights."""
    from transformers import AutoTokenizer, JanusForConditionalGeneration

    from align.testing import JANUS_IMAGE_TOKENS, make_tiny_janus

    path = make_tiny_janus(tmp_path_factory.mktemp("janus"), seed=0)
    tok = AutoTokenizer.from_pretrained(path)
    model = JanusForConditionalGeneration.from_pretrained(path).eval()
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in zip(("<image>", "<boi>", "<eoi>"), JANUS_IMAGE_TOKENS)}
    return model, tok, ids


# Themis served (tests/rewards/test_themis_service.py, tests/backends/test_ray_themis.py): one memorised checkpoint.

@pytest.fixture(scope="session")
def calendar_themis(tmp_path_factory) -> dict:
    """A tiny Themis checkpoint (`align.testing.memorised_themis`, a few s CPU, built once per session) that memorised
    a Calendar.target_day trace for each of `cases` (the true date a positive, a day later a negative) and a
    Clock.now call whose tool fails (question `hang[0]`, answer `hang[1]`) -> {path, cases, hang}."""
    from align.rewards.tara import render_themis
    from align.testing import calendar_themis_traces, memorised_themis
    from align.tools.trace import TOOL_FAILED_OBSERVATION, ToolCall

    cases = [("2023-06-01", 12), ("2021-02-25", 5), ("2020-02-27", 3)]  # the last one crosses a leap day
    hang = ("What time is it in Lima now?", "noon")
    samples = calendar_themis_traces(cases)
    fail = ToolCall("Clock.now", "Lima", "I need the time.", TOOL_FAILED_OBSERVATION)
    texts = [s["text"] for s in samples] + [render_themis(*hang, [fail], "The tool gave no answer.").text]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = memorised_themis(tmp_path_factory.mktemp("themis"), texts, [s["positive"] for s in samples] + [False])
    finally:
        torch.set_num_threads(threads)
    return {"path": path, "cases": cases, "hang": hang}
