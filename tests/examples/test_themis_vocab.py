"""examples/themis_vocab.py: one token per weather-cache city, text still round-trips (reference: the
hand-written city list and the texts themselves)."""
from __future__ import annotations

import pytest
from themis_vocab import add_word_tokens, city_token_strings  # examples/ (tests/conftest.py puts it on sys.path)

CACHE = {"Phnom Penh, 2023-06-21": "obs", "Neijiang, 2023-06-19": "obs", "Neijiang, 2023-06-20": "obs",
         "Kingston, 2023-06-01": "obs", "Kingston upon Hull, 2023-06-02": "obs", "not a key": "obs"}


def _bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = ["What is the humidity in Paris on 2023-06-21?", "Action Input: Paris, 2023-06-21", "The answer is Cloudy."] * 20
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>")


@pytest.fixture(scope="module")
def tok():
    t = _bpe()
    assert add_word_tokens(t, city_token_strings(CACHE)) == 4
    return t


def test_city_strings_are_the_caches_cities_with_a_leading_space():
    assert city_token_strings(CACHE) == [" Kingston", " Kingston upon Hull", " Neijiang", " Phnom Penh"]


@pytest.mark.parametrize("text, city", [
    ("Question: What is the humidity in Phnom Penh on 2023-06-21?", " Phnom Penh"),
    ("Action Input: Neijiang, 2023-06-19", " Neijiang"),
    ("The weather in Kingston upon Hull on 2023-06-02 is", " Kingston upon Hull"),  # the longest match wins
    ("Action Input: Kingston, 2023-06-01", " Kingston"),
])
def test_a_city_after_a_space_is_one_token_and_text_round_trips(tok, text, city):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces.count(city) == 1 and tok.convert_tokens_to_ids(city) >= 300  # an added id, beyond the BPE's
    assert tok.decode(ids) == text


def test_text_without_a_city_is_tokenised_as_before(tok):
    bare = _bpe()  # the same training, no added tokens
    for text in ("What is the humidity in Paris on 2023-06-21?", "Cities:\nNeijiang,Kingston"):  # no space before: BPE pieces
        assert tok(text)["input_ids"] == bare(text)["input_ids"], text
    # inside a longer word the added token still matches (the doc checks TARA's texts hold no such case)
    ids = tok("in Neijiangx", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[1] == " Neijiang" and tok.decode(ids) == "in Neijiangx"
    assert len(tok) == len(bare) + 4
