"""Stop strings (GPU_READINESS F12): the engine's incremental scan and the truncation's bisection give what brute
force gives (decode every prefix), on random rows with multi-token and multi-byte stops, and their decode work
grows about linearly in the row length instead of quadratically."""
from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from align.rollouts import stops
from align.rollouts.engine import RolloutEngine

STOPS = ["</tool_call>", "\nUser:", "é!", " ab"]
PIECES = ["a", "b", " ab", "é", "!", "</tool", "_call>", "\nUser", ":", "xyz", "日本", " ", "q"]


class CountingTokenizer:
    """The real tokenizer, counting every token id it is asked to decode."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def decode(self, ids, **kw):
        self.decoded += len(ids)
        return self.tok.decode(ids, **kw)

    def batch_decode(self, rows, **kw):
        self.decoded += sum(len(r) for r in rows)
        return self.tok.batch_decode(rows, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.fixture(scope="module")
def qwen(tiny_qwen_path):
    """The tiny model (the engine needs one) with a byte-level BPE (GPT-2 style, 400 ids, trained here in well
    under a second): multi-byte characters span several tokens and stop strings several merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["".join(random.Random(i).choice(PIECES) for _ in range(40)) for i in range(200)]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>")
    for s in STOPS:  # round trip, and the stops really are several tokens
        assert tok.decode(tok.encode(s, add_special_tokens=False)) == s
    assert len(tok.encode("é", add_special_tokens=False)) >= 1
    return AutoModelForCausalLM.from_pretrained(tiny_qwen_path).eval(), tok


def random_rows(tok, n, seed, pieces=12):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ids = tok.encode("".join(rng.choice(PIECES) for _ in range(rng.randint(1, pieces))), add_special_tokens=False)
        for _ in range(rng.randint(0, 2)):  # stray byte-level tokens: partial UTF-8 in the middle of a row
            ids.insert(rng.randint(0, len(ids)), rng.randrange(len(tok)))
        rows.append(ids)
    return rows


def contains(tok, ids):
    text = tok.decode(ids, skip_special_tokens=True)
    return any(s in text for s in STOPS)


def brute_first_cut(tok, ids):
    return next((cut for cut in range(1, len(ids) + 1) if contains(tok, ids[:cut])), None)


def padded(rows, pad):
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def test_truncation_matches_brute_force(qwen):
    _, tok = qwen
    rows = random_rows(tok, 300, seed=0)
    ids, mask = padded(rows, tok.pad_token_id or 0)
    new_mask, hit = stops.truncate_at_stop_strings(tok, ids, mask, STOPS)
    cuts = [brute_first_cut(tok, r) if contains(tok, r) else None for r in rows]
    assert 50 < sum(c is not None for c in cuts) < 280  # both outcomes are exercised
    for i, (r, cut) in enumerate(zip(rows, cuts)):
        assert bool(hit[i]) == (cut is not None)
        assert int(new_mask[i].sum()) == (cut if cut is not None else len(r)), (i, r)


def test_incremental_scan_finishes_rows_at_the_brute_force_step(qwen):
    model, tok = qwen
    engine = RolloutEngine(model, tok)
    rows = random_rows(tok, 200, seed=1, pieces=30)
    ids, mask = padded(rows, tok.pad_token_id or 0)
    state = SimpleNamespace(out_tokens=ids, out_live=mask.bool(), finished=torch.zeros(len(rows), dtype=torch.bool),
                            stop_scanned=0)
    finished_at = [None] * len(rows)
    for t in range(4, ids.shape[1] + 4, 4):  # the engine scans every 4 steps
        engine._hit_stop_strings(state, min(t, ids.shape[1]), STOPS)
        for i in range(len(rows)):
            if state.finished[i] and finished_at[i] is None:
                finished_at[i] = t
    for i, r in enumerate(rows):
        first = next((t for t in range(4, ids.shape[1] + 4, 4) if contains(tok, r[:t])), None)
        assert finished_at[i] == first, (i, r)
    assert sum(f is not None for f in finished_at) > 20


def test_decode_work_grows_linearly(qwen):
    model, tok = qwen
    counting = CountingTokenizer(tok)
    T = 400
    row = tok.encode("xyz q " * 200, add_special_tokens=False)[:T - 4] + tok.encode("</tool_call>", add_special_tokens=False)
    T = len(row)
    engine = RolloutEngine(model, counting)
    state = SimpleNamespace(out_tokens=torch.tensor([row]), out_live=torch.ones(1, T, dtype=torch.bool),
                            finished=torch.zeros(1, dtype=torch.bool), stop_scanned=0)
    for t in range(4, T - 4, 4):  # scans before the stop string is complete
        assert not engine._hit_stop_strings(state, t, STOPS)
    assert counting.decoded <= 20 * T  # linear in T (each scan: 4 new tokens and a short look-back); was ~T^2 / 8
    counting.decoded = 0
    mask, hit = stops.truncate_at_stop_strings(counting, torch.tensor([row]), torch.ones(1, T, dtype=torch.long), STOPS)
    assert bool(hit[0]) and int(mask.sum()) == T
    assert counting.decoded <= (math.ceil(math.log2(T)) + 2) * T  # every cut tried was ~T^2 / 2
