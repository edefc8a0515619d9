"""Entity-level tokens for the tiny generative Themis: one added token per city of the weather tool's cache.

A from-scratch 4 x 128 model copies a city from the question into its `history_weather` call badly when the
city is 2-4 BPE pieces (docs/experiments/themis_tara.md: it invents cities, so the cache lookup refuses the
call). A pretrained LM's vocabulary already knows common place names; here the tokenizer gets one token per
city the tool can answer for (the tool's domain, read from the cache's keys: no answer, observation or test
pair is involved), so copying the city is copying one token, which a copy circuit trained over the whole
vocabulary (examples/copy_pretrain.py) does for any id.

    from themis_vocab import add_word_tokens, city_token_strings
    add_word_tokens(tok, city_token_strings(load_weather_cache()))

Each token is the city with its leading space (" Phnom Penh"): in TARA's texts a city always follows a space
(`in Neijiang on`, `Action Input: Neijiang, ...`), and the byte-level pre-tokenizer keeps that space on the
word's first piece, so the added token replaces exactly those pieces. Added tokens are matched in raw text
before pre-tokenisation, leftmost-longest (" Kingston upon Hull" wins over " Kingston"), and decode to their
content, so text round-trips. They are also matched inside a longer word (" Bo" in " Bold"); the doc checks
that no TARA text has such a case for the cache's cities.
"""
from __future__ import annotations

from typing import Iterable, Mapping


def city_token_strings(cache: Mapping[str, str]) -> list[str]:
    """' City' for every distinct city among the weather cache's 'City, YYYY-MM-DD' keys (sorted; keys that do
    not parse are skipped, as the tool would refuse them)."""
    from align.tools.weather import parse_query

    cities = set()
    for key in cache:
        try:
            city, _ = parse_query(key)
        except Exception:
            continue
        cities.add(city.strip())
    return [f" {c}" for c in sorted(cities) if c]


def add_word_tokens(tok, words: Iterable[str]) -> int:
    """Add each word as a (non-special) token of `tok`; returns how many were new. normalized=False: match
    the raw text, spaces included."""
    from tokenizers import AddedToken

    return tok.add_tokens([AddedToken(w, normalized=False) for w in words])


__all__ = ["city_token_strings", "add_word_tokens"]
