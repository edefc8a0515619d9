"""Tiny models for the GvU tests: a random toy UMM and a random Janus, built locally and saved/loaded back."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def toy_umm_path(tmp_path_factory):
    """A random 2-layer toy UMM (3x3 grid) saved with save_pretrained + its tokenizer."""
    from align import toyworld as tw

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
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import JanusConfig, JanusForConditionalGeneration, LlamaConfig, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<bos>", "<eos>", "describe", "the", "image", "in", "detail", ".", "a", "red",
             "circle", "cat", "dog", "on", "mat"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens([AddedToken(t, normalized=False) for t in ("<image>", "<boi>", "<eoi>")])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")
    H = 32
    cfg = JanusConfig(
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=H, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                pad_token_id=0, bos_token_id=2, eos_token_id=3),
        # vision: 16 px / 8 px patches = 2x2 = 4 tokens; the VQ decoder gets num_patches = 2 -> 4 image tokens too.
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8,
                           projection_dim=H, num_image_tokens=4, depth=1),
        vq_config=dict(embed_dim=8, num_embeddings=32, latent_channels=32, base_channels=32, channel_multiplier=[1, 1],
                       num_res_blocks=1, projection_dim=H, image_token_embed_dim=H, num_hidden_layers=1),
        image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("janus")
    JanusForConditionalGeneration(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    model = JanusForConditionalGeneration.from_pretrained(path).eval()
    ids = {k: tok.convert_tokens_to_ids(k) for k in ("<boi>", "<eoi>", "<image>")}
    return model, tok, ids
