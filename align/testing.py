"""Tiny random models and a locally built tokenizer, written to disk like a real checkpoint.

No weights can be downloaded on our machines, so tests, examples and the CPU demo build a small model
from a `transformers` config (random init), save it with `save_pretrained`, and load it back through the
same `from_pretrained` path users take with real models.

Tiny unified multimodal models (UMMs) for the GvU tests: `make_umm_tokenizer` + `tiny_umm` (a causal LM whose
vocabulary holds image tokens, with `config.umm` set) and `make_tiny_janus` (transformers' Janus, random).
"""
from __future__ import annotations

import string
import time
from pathlib import Path

import torch

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
# Characters the character-level tokenizer knows: printable ASCII plus newline.
DEFAULT_ALPHABET = string.digits + string.ascii_letters + string.punctuation + " \n"

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def make_char_tokenizer(alphabet: str = DEFAULT_ALPHABET, extra_tokens: list[str] | None = None):
    """A character-level `PreTrainedTokenizerFast` built offline (no download): one token per character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values()) + list(extra_tokens or [])
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every character is a token
    tok.decoder = decoders.Fuse()  # join characters back without spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **SPECIAL_TOKENS)
    if extra_tokens:
        fast.add_special_tokens({"additional_special_tokens": list(extra_tokens)})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                max_position_embeddings: int = 512, **special_ids):
    """A `transformers` config of a tiny model of architecture `arch` ("llama" or "qwen2")."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=False, **special_ids,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"unknown tiny architecture {arch!r}; use 'llama' or 'qwen2'")


def make_tiny_model(path: str | Path, arch: str = "llama", hidden_size: int = 64, num_layers: int = 2,
                    num_heads: int = 4, seed: int = 0, alphabet: str = DEFAULT_ALPHABET,
                    extra_tokens: list[str] | None = None, max_position_embeddings: int = 512) -> Path:
    """Write a tiny random causal LM and its tokenizer to `path`; returns the path.

    Load it back with `AutoModelForCausalLM.from_pretrained(path)` / `AutoTokenizer.from_pretrained(path)`,
    or give the path to `align.train` as `model.path`.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_char_tokenizer(alphabet, extra_tokens)
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = tiny_config(arch, len(tokenizer), hidden_size, num_layers, num_heads, max_position_embeddings, **ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ------------------------------------------------------------------------- tiny unified multimodal models

UMM_SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>"}


def make_umm_tokenizer(words: list[str], image_tokens: list[str], boi: str = "<boi>", eoi: str = "<eoi>"):
    """A word-level tokenizer for a tiny UMM, built offline: <pad> <unk> <bos> <eos>, then `words` (lower-cased,
    split on whitespace), then `boi`, `eoi` and `image_tokens` as special tokens, then "\\n" as a token (keeps
    an instruction's line breaks)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = list(UMM_SPECIAL_TOKENS.values()) + [w for w in words if w not in UMM_SPECIAL_TOKENS.values()]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    specials = [boi, eoi] + list(image_tokens)
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in specials])
    tok.add_tokens([AddedToken("\n", normalized=False)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **UMM_SPECIAL_TOKENS)


def tiny_umm(tokenizer, layout: dict, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4, seed: int = 0,
             max_position_embeddings: int = 128):
    """A fresh random tiny UMM: a LlamaForCausalLM over `tokenizer`'s vocabulary with `config.umm = layout`
    (see `align.rollouts.umm.make_umm_layout`); save it with `save_pretrained` beside the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                         max_position_embeddings=max_position_embeddings, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    config.umm = layout
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


# JanusProcessor's image placeholder, image start (boi) and image end (eoi) tokens
JANUS_IMAGE_TOKENS = ("<image_placeholder>", "<begin_of_image>", "<end_of_image>")


def make_tiny_janus(path: str | Path, seed: int = 0) -> Path:
    """Write a random `JanusForConditionalGeneration` (4 image tokens per image: 16 px images, 8 px patches,
    a 32-code VQ codebook) in Hugging Face's native Janus format, as a converted Janus-Pro checkpoint has it:
    config.json with model_type janus, a word-level tokenizer with JanusProcessor's <image_placeholder>,
    <begin_of_image>, <end_of_image>, and generation_config.json with generation_kwargs.boi_token_id. Returns the path."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import (
        GenerationConfig,
        JanusConfig,
        JanusForConditionalGeneration,
        LlamaConfig,
        PreTrainedTokenizerFast,
    )

    words = ["<pad>", "<unk>", "<bos>", "<eos>", "describe", "the", "image", "in", "detail", ".", "a", "red",
             "circle", "cat", "dog", "on", "mat"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens([AddedToken(t, normalized=False) for t in JANUS_IMAGE_TOKENS])
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
        image_token_id=tok.convert_tokens_to_ids(JANUS_IMAGE_TOKENS[0]))
    torch.manual_seed(seed)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = JanusForConditionalGeneration(cfg)
    model.generation_config = GenerationConfig(
        bos_token_id=2, eos_token_id=3, pad_token_id=0,
        generation_kwargs={"boi_token_id": tok.convert_tokens_to_ids(JANUS_IMAGE_TOKENS[1])})
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_run_config(algorithm: str, model: str | Path, data: str | Path, run_dir: str | Path, reward, /,
                    *layers: dict, **sections: dict) -> dict:
    """A short CPU run config (dict) for tests and examples: one step of 2 prompts, 4 new tokens at
    temperature 1, no progress output, no final checkpoint. `layers` (dicts of sections) and then `sections`
    merge over these defaults section by section, key by key."""
    cfg = {
        "algorithm": algorithm,
        "model": {"path": str(model)},
        "data": {"path": str(data)},
        "reward": {"functions": [reward]},
        "rollout": {"max_new_tokens": 4, "temperature": 1.0},
        "train": {"steps": 1, "prompts_per_step": 2, "micro_batch_size": 8, "lr": 1e-3, "seed": 0},
        "logging": {"run_dir": str(run_dir), "progress": False, "print_every": 0},
        "checkpoint": {"save_final": False},
    }
    for layer in (*layers, sections):
        for section, values in layer.items():
            cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


class CharFraction:
    """A reward for tiny test runs: the fraction of response characters equal to `char` (a dense signal a tiny
    model can learn); named `frac_<char>` like a TRL reward function."""

    def __init__(self, char: str = "7"):
        self.char = char
        self.__name__ = f"frac_{char}"

    def __call__(self, prompts, completions, **kwargs):
        return [sum(c == self.char for c in s) / max(len(s), 1) for s in completions]


class SlowReward:
    """A reward for throughput benchmarks: mean character code / 128, after sleeping `ms` per sample (stands for
    a remote reward model or a tool-using reward)."""

    def __init__(self, ms: float):
        self.ms = ms
        self.__name__ = "slow_reward"

    def __call__(self, prompts, completions, **kwargs):
        time.sleep(self.ms * len(completions) / 1000.0)
        return [sum(map(ord, s)) / (128.0 * max(len(s), 1)) for s in completions]
