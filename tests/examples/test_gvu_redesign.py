"""The GvU redesign's pieces: captions that state counts and clutter, the decisive token of a false caption,
near-miss perturbations, the unlikelihood pre-training loss, the pre-RL gate and the paired t-interval."""
from __future__ import annotations

import math
import random

import gvu_captions as gc  # examples/ (tests/conftest.py puts it on sys.path)
import gvu_gate
import gvu_stats
import pytest
import toyworld as tw

G = 3


def grid(*cells):
    """grid((r, c, colour, shape), ...) -> row-major values of a 3x3 image."""
    values = [0] * (G * G)
    for r, c, color, shape in cells:
        values[r * G + c] = tw.cell_value(color, shape)
    return values


def test_true_captions_state_counts_and_clutter():
    four = grid((0, 0, "red", "circle"), (0, 1, "blue", "circle"), (1, 0, "green", "circle"), (2, 2, "red", "circle"))
    caps = gc.true_captions(tuple(four), G)
    assert caps["counts"] == ("four circles",) and "counting" not in caps  # neither "two" nor "three circles"
    assert "clutter" not in caps and "a circle" not in caps.get("single_object", ())  # 4 objects > 1 named + 2
    seven = [tw.cell_value("red", "square")] * 7 + [0, 0]
    caps = gc.true_captions(tuple(seven), G)
    assert caps["clutter"] == ("many shapes",) and caps["counts"] == ("seven squares",)
    assert set(caps) == {"counts", "clutter"}


def test_decisive_token_is_the_first_wrong_word():
    four = grid((0, 0, "red", "circle"), (0, 1, "blue", "circle"), (1, 0, "green", "circle"), (2, 2, "red", "circle"))
    assert gc.decisive_index("three circles", four, G) == 0
    # two circles and three squares: "three" starts the true "three squares"; "circles" is the wrong word
    mixed = grid((0, 0, "red", "circle"), (0, 1, "red", "circle"), (1, 0, "red", "square"), (1, 1, "red", "square"),
                 (2, 2, "red", "square"))
    assert gc.decisive_index("three circles", mixed, G) == 1 and gc.decisive_index("three squares", mixed, G) is None
    # a circle right of a triangle: "a circle left of ..." is wrong at "left" (index 2)
    pos = grid((0, 2, "red", "circle"), (0, 0, "blue", "triangle"))
    assert gc.decisive_index("a circle left of a triangle", pos, G) == 2
    assert gc.decisive_index("a circle right of a triangle", pos, G) is None
    assert gc.decisive_index("a green circle", pos, G) == 1


def test_perturbations_are_near_misses_the_checker_rejects():
    rng = random.Random(0)
    for spec in [s for task in tw.TASKS for s in tw.all_specs(task)]:
        values = tw.scene_for(spec, rng, G)
        for kind, pert in gc.perturbations(spec, values, rng, G).items():
            assert not tw.check(spec, pert, G), (spec.caption(), kind)
            n_before, n_after = sum(v != 0 for v in values), sum(v != 0 for v in pert)
            if kind.startswith("count"):
                shape = spec.objects[0][1]
                k = sum(1 for v in values if v and tw.cell_object(v)[1] == shape)
                k2 = sum(1 for v in pert if v and tw.cell_object(v)[1] == shape)
                assert k2 - k == int(kind[5:]) and n_after - n_before == k2 - k
            elif kind == "clutter":
                assert n_after == n_before + 3
            else:  # swap / recolour keep the number of objects
                assert n_after == n_before and sorted(v == 0 for v in pert) == sorted(v == 0 for v in values)


def test_pretraining_loss_matches_a_float64_reference():
    import torch

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, generator=g)
    labels = torch.tensor([[-100, 3, 1, -100], [-100, -100, -100, -100]])
    negatives = [(1, 2, 4), (0, 3, 0)]
    got = gc.pretraining_loss(logits, labels, negatives, unlikelihood_weight=0.5)
    p = torch.softmax(logits.double(), -1)
    ce = -(math.log(p[0, 0, 3]) + math.log(p[0, 1, 1])) / 2  # labels at t are predicted by the logits at t - 1
    ul = -(math.log(1 - p[1, 1, 4]) + math.log(1 - p[0, 2, 0])) / 2
    assert float(got) == pytest.approx(ce + 0.5 * ul, rel=1e-5)


def test_pretraining_batch_puts_unlikelihood_on_the_decisive_word():
    tok = tw.build_tokenizer(gc.EXTRA_WORDS)
    assert tok.unk_token_id not in tok("four circles many shapes nine", add_special_tokens=False)["input_ids"]
    ids, att, labels, negatives = gc.pretraining_batch(tok, random.Random(1), 64, G)
    assert negatives
    eoi = tok.convert_tokens_to_ids(tw.EOI)
    for row, pos, token in negatives:
        assert int(ids[row, pos]) == token and bool((labels[row] == -100).all())
        seq = ids[row].tolist()
        image = tw.image_values(seq[1:seq.index(eoi)], {"image_token_ids": [tok.convert_tokens_to_ids(tw.image_token(k))
                                                                             for k in range(tw.NUM_VALUES)]})
        head = seq.index(tok.convert_tokens_to_ids("\n"), seq.index(eoi) + 2) + 1  # after the instruction's last "\n"
        words = tok.convert_ids_to_tokens(seq[head:pos + 1])
        # brute force over every caption that holds: the words before the decisive one start one of them, the
        # decisive word does not
        true = [c.split() for caps in gc.true_captions(tuple(image), G).values() for c in caps]
        assert any(w[:len(words) - 1] == words[:-1] for w in true)
        assert not any(w[:len(words)] == words for w in true)


def _oracle(images, texts):
    return [float(tw.check(t, img, G)) for img, t in zip(images, texts)]


def _counter(images, texts):
    """The old base's failure: reward grows with the number of objects of the named shape."""
    return [sum(1 for v in img if v and tw.cell_object(v)[1] in t) / 9 for img, t in zip(images, texts)]


def test_gate_passes_an_oracle_reward_and_fails_a_monotone_count_reward():
    rng = random.Random(0)
    specs = [s for task in tw.TASKS for s in tw.all_specs(task) for _ in range(4)]
    images = [tw.scene_for(s, rng, G) if i % 2 else tw.random_scene(rng, G) for i, s in enumerate(specs)]
    ok = gvu_gate.gate(_oracle, specs, images, 4, G)
    assert ok["passed"] and ok["count_curve"]["two"]["peak"] == 2 and ok["count_curve"]["three"]["peak"] == 3
    assert all(v["auc"] == 1.0 for v in ok["perturbed"].values())
    bad = gvu_gate.gate(_counter, specs, images, 4, G)
    assert not bad["passed"] and bad["count_curve"]["three"]["peak"] == 6
    assert bad["perturbed"]["counting/count+1"]["auc"] == 0.0  # one more circle always scores higher
    assert "gate (AUC >= 0.8" in gvu_gate.gate_table(bad) and "FAILED" in gvu_gate.gate_table(bad)


def test_auc_counts_ties_as_half():
    assert gvu_gate.auc([(1.0, 0.0), (0.5, 0.5), (0.0, 1.0), (2.0, 1.0)]) == pytest.approx(2.5 / 4)


def test_t_quantiles_against_the_integrated_t_density():
    def density(x, v):
        return math.gamma((v + 1) / 2) / (math.sqrt(v * math.pi) * math.gamma(v / 2)) * (1 + x * x / v) ** (-(v + 1) / 2)

    for v, q in enumerate(gvu_stats.T975, start=1):
        n = 4000  # Simpson's rule on [0, q]: P(|T| <= q) = 2 * integral
        h = q / n
        s = density(0, v) + density(q, v) + sum((4 if i % 2 else 2) * density(i * h, v) for i in range(1, n))
        assert 2 * s * h / 3 == pytest.approx(0.95, abs=2e-4), v


def test_paired_ci_by_hand():
    ci = gvu_stats.paired_ci([0.5, 0.4, 0.6], [0.6, 0.6, 0.9])  # d = 0.1, 0.2, 0.3: mean 0.2, sd 0.1
    half = 4.303 * 0.1 / math.sqrt(3)
    assert ci["mean"] == pytest.approx(0.2) and ci["lo"] == pytest.approx(0.2 - half) and ci["hi"] == pytest.approx(0.2 + half)
    assert gvu_stats.verdict(ci) == "n.s." and gvu_stats.verdict(gvu_stats.paired_ci([0, 0, 0], [0.2, 0.21, 0.19])) == "up (shown)"
    with pytest.raises(ValueError):
        gvu_stats.paired_ci([0.1], [0.2, 0.3])


def _fake_run(scorer, kl, before, after):
    """A results.json shape as examples/gvu_toy.py writes it: every metric equal to `before` / `after`."""
    gen = lambda v: {k: v for k in ("overall", *gvu_stats.TASKS, "objects_per_image")}  # noqa: E731
    seeds = {str(i): {"before": {"generation": gen(before + 0.01 * i), "understanding": {"overall": 0.9}},
                      "after": {"generation": gen(after + 0.02 * i), "understanding": {"overall": 0.9}},
                      "kl_last": 0.05, "reward_first": 0.5, "reward_last": 0.6} for i in range(3)}
    return {"scorer": scorer, "kl_coef": kl, "seeds": seeds}


def test_stats_main_writes_tables_json_and_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    for name, run in {"p": _fake_run("policy", 0.03, 0.5, 0.6), "t": _fake_run("teacher", 0.1, 0.5, 0.55)}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(__import__("json").dumps(run))
    summary = gvu_stats.main([str(tmp_path / "p"), str(tmp_path / "t"), "--out", str(tmp_path / "out")])
    # overall d = (0.6 + 0.02 i) - (0.5 + 0.01 i) = 0.1 + 0.01 i for i = 0, 1, 2: mean 0.11
    assert summary["scorer policy, beta 0.03"]["overall"]["diff"]["mean"] == pytest.approx(0.11)
    png = (tmp_path / "out" / "gvu.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "up (shown)" in (tmp_path / "out" / "summary.md").read_text()
