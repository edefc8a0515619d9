"""Tiny models for the GvU tests: a random toy UMM and a random Janus, built locally and saved/loaded back."""
from __future__ import annotations

import pytest


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

    from align.testing import make_tiny_janus

    path = make_tiny_janus(tmp_path_factory.mktemp("janus"), seed=0)
    tok = AutoTokenizer.from_pretrained(path)
    model = JanusForConditionalGeneration.from_pretrained(path).eval()
    ids = {k: tok.convert_tokens_to_ids(k) for k in ("<boi>", "<eoi>", "<image>")}
    return model, tok, ids
