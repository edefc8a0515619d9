"""Tiny models and a locally built tokenizer for the reward-model tests (random init, saved and loaded back)."""
from __future__ import annotations

from pathlib import Path

CORPUS = [
    "### USER:\nQuestion: Which day of the week is 2008-06-16?\nAnswer: 2008-06-16 is Monday\n### ASSISTANT:\n",
    "Thought: I need to search what day of the week is 2008-06-16.\nAction: Calendar.week_day\nAction Input: 2008-06-16\n",
    "Observation: Monday\nWork: The answer matches the tool's result. Finished. Do I need to use a tool? No",
    "The weather for Riyadh on 2023-05-07 is: overall weather: Partly cloudy; temperature: 34.1(C); humidity: 15.0.",
    "Context: The difference between 2015-11-05 and 2011-01-11 is 1759 days; 0123456789 abcdefghijklmnopqrstuvwxyz",
]


def build_tokenizer(out_dir: str | Path, extra_corpus: list[str] | None = None, vocab_size: int = 400):
    """A byte-level BPE tokenizer (exact decode/encode round trip) with <pad>, <s>, </s>; saved to out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS + list(extra_corpus or []), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(str(out_dir))
    return tok


def make_tiny_causal_lm(out_dir: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2, extra_corpus=None, vocab_size: int = 400):
    """A 2-layer Llama with random weights + the tokenizer, saved with save_pretrained -> out_dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tok = build_tokenizer(out_dir, extra_corpus, vocab_size)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(str(out_dir))
    return out_dir


def make_tiny_bert(out_dir: str | Path, seed: int = 0, hidden: int = 32):
    """A 2-layer BERT encoder (no head) + the tokenizer -> out_dir."""
    import torch
    from transformers import BertConfig, BertModel

    out_dir = Path(out_dir)
    tok = build_tokenizer(out_dir)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=2 * hidden, max_position_embeddings=512, pad_token_id=tok.pad_token_id)
    BertModel(cfg).save_pretrained(str(out_dir))
    return out_dir


_CACHE: dict[tuple, Path] = {}


def cached(kind: str, seed: int = 0) -> Path:
    """A tiny model directory built once per test process ("llama" or "bert"); treat it as read-only."""
    import tempfile

    key = (kind, seed)
    if key not in _CACHE:
        root = Path(tempfile.mkdtemp(prefix=f"align-rm-tiny-{kind}-"))
        _CACHE[key] = make_tiny_causal_lm(root, seed=seed) if kind == "llama" else make_tiny_bert(root, seed=seed)
    return _CACHE[key]
