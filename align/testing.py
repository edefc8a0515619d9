"""Tiny random models and a locally built tokenizer, written to disk like a real checkpoint.

No weights can be downloaded on our machines, so tests, examples and the CPU demo build a small model
from a `transformers` config (random init), save it with `save_pretrained`, and load it back through the
same `from_pretrained` path users take with real models.
"""
from __future__ import annotations

import string
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
