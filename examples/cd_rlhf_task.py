"""The CD-RLHF toy task: five made-up words of several word pieces each, a reward with many near-optimal
answers and a small bias towards a few favourite words.

- Words: 40 words of 3 or 4 two-letter syllables ("ka", "ro", ...), fixed by a private RNG (the same for
  every seed). Each word's first syllable is its own, so once the first piece is written the rest of the
  word is determined: continuation pieces become the policy's top-1 token, and only word starts are
  real choices (about 1 token in 4 to 5, near the ~20% of gated tokens the paper reports on real text).
- Tokens: a WordPiece vocabulary (first pieces as themselves, continuations as "##ro"), so a word of k
  syllables is k tokens and decoding joins them back into the word.
- Reward (`FavouriteWordsReward`, a rule reward standing in for a reward model): summed over the five word
  slots, +0.4 for one of the 24 allowed words, +0.5 for one of the 4 favourites among them, -0.4 for the
  16 other words or anything else; -2.0 (the minimum) when the completion does not hold exactly five words.
  The reward-optimal set (favourites only, 4^5 = 1,024 answers) scores 2.5, the near-optimal set (any
  allowed words, 24^5 ~ 8 million answers) 2.0-2.5. The range [-2, 2.5] sits inside the paper's score
  clip of 2.5.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Sequence

N_WORDS = 5
N_ALLOWED, N_FAVOURITE, N_OTHER = 24, 4, 16
ALLOWED_VALUE, FAVOURITE_VALUE, OTHER_VALUE, BAD_FORMAT = 0.4, 0.5, -0.4, -2.0
PROMPTS = ("list five :", "say five :", "five please :", "give five :", "your five :", "five more :",
           "now five :", "some five :")
SPECIALS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
SYLLABLES = tuple(c + v for c in _CONSONANTS for v in _VOWELS)  # 70 pieces of two letters


def _loops(words: Sequence[str]) -> bool:
    """True when some continuation piece can follow itself through a chain of words' piece transitions."""
    follows: dict[str, set[str]] = {}
    for w in words:
        pieces = [w[i:i + 2] for i in range(0, len(w), 2)]
        for a, b in zip(pieces[1:], pieces[2:]):
            follows.setdefault(a, set()).add(b)
    state: dict[str, int] = {}  # depth-first search for a cycle: 1 = on the current path, 2 = done

    def cyclic(p: str) -> bool:
        state[p] = 1
        for q in follows.get(p, ()):
            if state.get(q) == 1 or (q not in state and cyclic(q)):
                return True
        state[p] = 2
        return False

    return any(p not in state and cyclic(p) for p in list(follows))


def _make_words() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Words with no repeated syllable and no cycle among continuation pieces: the first version had "sinono"
    (##no after ##no), and the one diverged plain-PPO run broke down into "##no ##no ##no ..." loops, a
    repetition the valid words themselves had taught (docs/experiments/cd_rlhf.md, "The divergence")."""
    rng = random.Random(20250111)  # fixed: the task is the same for every seed
    n = N_ALLOWED + N_OTHER
    firsts = rng.sample(SYLLABLES, n)
    words: list[str] = []
    for first in firsts:
        while True:  # redraw a word's continuations until the word set stays loop-free
            rest = [rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))]
            word = "".join([first] + rest)
            if len({first, *rest}) == len(rest) + 1 and not _loops(words + [word]):
                break
        words.append(word)
    return tuple(words[:N_ALLOWED]), tuple(words[N_ALLOWED:])


ALLOWED, OTHER = _make_words()
FAVOURITES = ALLOWED[:N_FAVOURITE]
WORDS = ALLOWED + OTHER


def word_value(word: str) -> float:
    if word in FAVOURITES:
        return FAVOURITE_VALUE
    return ALLOWED_VALUE if word in ALLOWED else OTHER_VALUE


class FavouriteWordsReward:
    """TRL-style rule reward: sum over the five word slots of +0.4 (allowed), +0.5 (favourite), -0.4 (other);
    -2.0 when the completion does not hold exactly five words."""

    __name__ = "favourite_words"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
        out = []
        for text in completions:
            words = text.split()
            out.append(sum(word_value(w) for w in words) if len(words) == N_WORDS else BAD_FORMAT)
        return out


MAX_REWARD = N_WORDS * FAVOURITE_VALUE


def word_pieces(word: str) -> list[str]:
    pieces = [word[i:i + 2] for i in range(0, len(word), 2)]
    return [pieces[0]] + ["##" + p for p in pieces[1:]]


def piece_tokenizer():
    """A WordPiece `PreTrainedTokenizerFast`: every syllable as a word start and as a "##" continuation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = list(SPECIALS.values()) + list(SYLLABLES) + ["##" + s for s in SYLLABLES]
    vocab += sorted({w for p in PROMPTS for w in p.split()} - set(vocab))
    tok = Tokenizer(models.WordPiece(vocab={w: i for i, w in enumerate(vocab)}, unk_token=SPECIALS["unk_token"],
                                     max_input_chars_per_word=100))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **SPECIALS)
    for word in WORDS:  # WordPiece's greedy longest match must give exactly the intended pieces
        got = fast.convert_ids_to_tokens(fast(word, add_special_tokens=False).input_ids)
        if got != word_pieces(word):
            raise AssertionError(f"tokenizer splits {word!r} into {got}, expected {word_pieces(word)}")
    return fast


def write_data(out_dir: Path, seed: int, n_sft: int = 2000, n_rl: int = 256) -> dict[str, Path]:
    """SFT data: uniformly random five-word lists over all 40 words (a diverse, mediocre warm start)."""
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    sft = [{"prompt": rng.choice(PROMPTS), "completion": " ".join(rng.choice(WORDS) for _ in range(N_WORDS))}
           for _ in range(n_sft)]
    rl = [{"prompt": PROMPTS[i % len(PROMPTS)]} for i in range(n_rl)]
    paths = {"sft": out_dir / "sft.jsonl", "prompts": out_dir / "prompts.jsonl"}
    paths["sft"].write_text("".join(json.dumps(r) + "\n" for r in sft))
    paths["prompts"].write_text("".join(json.dumps(r) + "\n" for r in rl))
    return paths


def oracle_groups(words: Sequence[str], n_groups: int, n: int, seed: int) -> list[list[str]]:
    """Samples of a policy uniform over words^5 (each slot independent): the spread a reward-indifferent
    policy over that set would show under the same evaluation protocol."""
    rng = random.Random(seed)
    return [[" ".join(rng.choice(words) for _ in range(N_WORDS)) for _ in range(n)] for _ in range(n_groups)]


def word_shares(groups: Sequence[Sequence[str]]) -> dict[str, float]:
    """Share of word slots holding a favourite / an allowed word / no word of the task at all (broken
    word pieces), over all samples; and the share of samples that are empty."""
    texts = [text for g in groups for text in g]
    words = [w for text in texts for w in text.split()]
    n = max(len(words), 1)
    return {"favourite_share": sum(w in FAVOURITES for w in words) / n,
            "allowed_share": sum(w in ALLOWED for w in words) / n,
            "invalid_share": sum(w not in WORDS for w in words) / n,
            "empty_share": sum(not t.split() for t in texts) / max(len(texts), 1)}
