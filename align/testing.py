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


class WrappedBackend:
    """A rollout Backend around the trainer's own (`trainer.backend = MyWrap(trainer.backend)`): everything is
    delegated; subclasses override `generate` to edit the batches (e.g. mark observation tokens) in tests."""

    def __init__(self, inner):
        self.inner = inner

    def generate(self, prompts, columns, sample_ids, params):
        return self.inner.generate(prompts, columns, sample_ids, params)

    def score(self, batch):
        return self.inner.score(batch)

    def sync(self, version: int) -> None:
        self.inner.sync(version)

    def close(self) -> None:
        self.inner.close()


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


# ------------------------------------------------------------------------- a memorised Themis reward model

def _generated_positions(text: str, offsets: list[tuple[int, int]], assistant_start: int) -> list[bool]:
    """Which tokens of a Themis sequence the trace loop asks the model for: everything after the assistant
    header except an observation's text (" Observation: ...\\n" after <start_observation>), which the loop
    writes itself from the tool's output."""
    from align.tools.trace import START_OBSERVATION

    injected = []
    at = text.find(START_OBSERVATION, assistant_start)
    while at != -1:
        start = at + len(START_OBSERVATION)
        end = text.find("\n", start)
        injected.append((start, len(text) if end == -1 else end + 1))
        at = text.find(START_OBSERVATION, start)
    return [a >= assistant_start and not any(s <= a < e for s, e in injected) for a, _ in offsets]


def memorised_themis(out_dir: str | Path, traces, positive, *, seed: int = 0, hidden_size: int = 64,
                     num_layers: int = 1, num_heads: int = 4, lr: float = 3e-3, max_steps: int = 600,
                     check_every: int = 10, margin: float = 2.0) -> Path:
    """A tiny Themis RM that has memorised `traces`, saved with `save_themis` to `out_dir` -> the path.

    traces: full Themis sequences without EOS ("### USER:\\n...Answer: a\\n### ASSISTANT:\\n<start_tool>
    Thought: ...\\nAction: A\\nAction Input: I\\n<start_observation> Observation: O\\n<start_work> Work: r",
    e.g. `align.rewards.tara.render_themis(...).text`); positive: one bool per trace (positive answer or not).

    A random tiny Llama (1 layer x 64 by default: it memorises in fewer steps than 2 layers, ~2-8 s CPU for 4-12
    traces) over a character tokenizer holding the three Themis tokens is trained (full batch,
    Adam) on the assistant part + EOS, and its value head on a logistic loss with labels +-1, until teacher-forced
    argmax reproduces every token the trace loop generates (so greedy decoding reproduces each trace, given
    the same observations) and min(positive score) - max(negative score) >= margin; checked every
    `check_every` steps, RuntimeError if `max_steps` are not enough. For the reward-worker and service tests:
    the loop then calls the real tools the traces name.
    """
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    from align.rewards.themis import ASSISTANT_HEADER, ThemisModel, pad_left, save_themis
    from align.tools.trace import THEMIS_SPECIAL_TOKENS

    hf_logging.disable_progress_bar()
    traces, positive = list(traces), [bool(p) for p in positive]
    if not traces or len(traces) != len(positive) or all(positive) or not any(positive):
        raise ValueError("memorised_themis needs traces and one label each, with both positives and negatives")
    tok = make_char_tokenizer(extra_tokens=list(THEMIS_SPECIAL_TOKENS))
    rows, masks = [], []
    for text in traces:
        if ASSISTANT_HEADER not in text:
            raise ValueError(f"a Themis trace holds {ASSISTANT_HEADER!r}; got {text[:60]!r}")
        enc = tok(text, return_offsets_mapping=True)
        if tok.unk_token_id in enc["input_ids"]:
            raise ValueError(f"a trace holds characters outside the tokenizer's alphabet: {text[:60]!r}")
        start = text.index(ASSISTANT_HEADER) + len(ASSISTANT_HEADER)
        rows.append(list(enc["input_ids"]) + [tok.eos_token_id])
        masks.append(_generated_positions(text, list(enc["offset_mapping"]), start) + [True])
    longest = max(len(r) for r in rows)
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = tiny_config("llama", len(tok), hidden_size, num_layers, num_heads, max(512, 2 * longest), **ids)
    torch.manual_seed(seed)
    model = ThemisModel(AutoModelForCausalLM.from_config(config))
    model.lm.generation_config = GenerationConfig(**ids)
    input_ids = pad_left(rows, tok.pad_token_id)
    attention = pad_left([[1] * len(r) for r in rows], 0)
    # weight w[t] = 1 where token t is generated by the model (predicted from t-1)
    target_w = pad_left([[float(m) for m in mk] for mk in masks], 0.0, dtype=torch.float32)[:, 1:]
    labels = torch.tensor([1.0 if p else -1.0 for p in positive])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for step in range(1, max_steps + 1):
        logits, rewards = model(input_ids, attention)
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none")
        lm = (ce.view_as(target_w) * target_w).sum() / target_w.sum()
        loss = lm + F.softplus(-labels * rewards).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # keeps Adam at this lr from overshooting late on
        opt.step()
        if step % check_every == 0:
            with torch.no_grad():
                logits, rewards = model.eval()(input_ids, attention)
                model.train()
            wrong = ((logits[:, :-1].argmax(-1) != input_ids[:, 1:]) & (target_w > 0)).sum().item()
            pos = [float(r) for r, p in zip(rewards, positive) if p]
            neg = [float(r) for r, p in zip(rewards, positive) if not p]
            if wrong == 0 and min(pos) - max(neg) >= margin:
                save_themis(model.eval(), tok, out_dir, memorised_steps=step)
                return Path(out_dir)
    raise RuntimeError(f"memorised_themis: {max_steps} steps did not memorise the {len(traces)} traces "
                       f"({wrong} generated tokens still wrong); raise max_steps or hidden_size")


def calendar_themis_traces(cases, rationales: tuple[str, str] = ("The answer matches the tool.",
                                                                "The answer differs from the tool.")) -> list[dict]:
    """Themis training sequences for "What date is N days after D?" questions, for `memorised_themis`.

    cases: (day "YYYY-MM-DD", n) pairs. Each gives two samples: the true date (datetime: day + n days) as a
    positive and the date one day later as a negative, both with a trace that calls Calendar.target_day with
    "day, n" and observes the true date -> [{question, answer, positive, observation, text}, ...]."""
    from datetime import date, timedelta

    from align.rewards.tara import render_themis
    from align.tools.trace import ToolCall

    out = []
    for day, n in cases:
        true = (date.fromisoformat(day) + timedelta(days=n)).isoformat()
        wrong = (date.fromisoformat(day) + timedelta(days=n + 1)).isoformat()
        question = f"What date is {n} days after {day}?"
        call = ToolCall("Calendar.target_day", f"{day}, {n}", "I need the date.", true)
        for answer, positive, rationale in ((true, True, rationales[0]), (wrong, False, rationales[1])):
            out.append({"question": question, "answer": answer, "positive": positive, "observation": true,
                        "text": render_themis(question, answer, [call], rationale).text})
    return out
