"""examples/copy_pretrain.py: the copy rows and the loss mask, checked element by element."""

from __future__ import annotations

import copy_pretrain as C  # examples/ (tests/conftest.py puts it on sys.path)
import pytest
import torch


def test_each_row_is_span_sep_span_and_only_the_repeat_is_labelled():
    g = torch.Generator().manual_seed(3)
    vocab = list(range(50, 90))
    for _ in range(5):
        ids, labels = C.copy_batch(vocab, 4, (3, 7), sep_id=7, generator=g)
        n = (ids.shape[1] - 1) // 2
        assert 3 <= n <= 7 and ids.shape == (4, 2 * n + 1)
        for row, lab in zip(ids.tolist(), labels.tolist()):
            assert row[n] == 7 and row[:n] == row[n + 1:]
            assert all(50 <= t < 90 for t in row[:n])
            assert lab[:n + 1] == [-100] * (n + 1) and lab[n + 1:] == row[n + 1:]


def test_bad_spans_are_refused():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="span"):
        C.copy_batch([1, 2, 3], 2, (0, 4), 0, g)
    with pytest.raises(ValueError, match="2 ids"):
        C.copy_batch([1], 2, (1, 4), 0, g)


def test_a_few_steps_train_in_place_and_report_the_copy_loss(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    before = [p.detach().clone() for p in model.parameters()]
    stats = C.pretrain_copy(model, range(4, 64), steps=3, batch_size=4, lr=1e-3, seed=0, span=(2, 5), sep_id=1,
                            warmup=0)
    assert stats["steps"] == 3 and torch.isfinite(torch.tensor(stats["copy_loss"]))
    # untrained: about log(60) nats per repeated token (uniform over the span's ids)
    assert abs(stats["first_loss"] - torch.log(torch.tensor(64.0)).item()) < 0.6
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())) and not model.training


def test_sub_vocabulary_rows_reuse_few_ids_and_bos_leads_every_row():
    g = torch.Generator().manual_seed(5)
    vocab = list(range(100, 400))
    ids, labels = C.copy_batch(vocab, 64, (40, 40), sep_id=9, generator=g, sub_vocab=(3, 3), bos_id=1)
    assert ids.shape == (64, 1 + 40 + 1 + 40)
    sets = []
    for row, lab in zip(ids.tolist(), labels.tolist()):
        assert row[0] == 1 and row[41] == 9 and row[1:41] == row[42:]
        assert lab[:42] == [-100] * 42 and lab[42:] == row[42:]
        span = set(row[1:41])
        # 40 draws from 3 ids: all 3 appear unless a miss of prob <= 3 * (2/3)^40 ~ 3e-7
        assert len(span) == 3 and span <= set(vocab)
        sets.append(frozenset(span))
    assert len(set(sets)) > 50  # each row has its own sub-vocabulary (C(300, 3) choices)
    # log-uniform k in [2, 300]: about half the rows draw from at most sqrt(2 * 301) ~ 24.5 ids
    ids, _ = C.copy_batch(vocab, 400, (200, 200), sep_id=9, generator=g, sub_vocab=(2, 300))
    small = sum(len(set(r[:200])) <= 24 for r in ids.tolist())
    assert 140 <= small <= 260
    with pytest.raises(ValueError, match="sub_vocab"):
        C.copy_batch(vocab, 2, (2, 4), 9, g, sub_vocab=(1, 5))


def test_prefix_and_gap_move_the_span_and_leave_the_unannounced_first_copy_unlabelled():
    g = torch.Generator().manual_seed(11)
    vocab = list(range(20, 60))
    seen = set()
    for _ in range(20):
        ids, labels = C.copy_batch(vocab, 3, (5, 5), sep_id=2, generator=g, bos_id=1, prefix=(0, 6), gap=(0, 6))
        length = ids.shape[1]
        r_plus_f = length - (1 + 5 + 1 + 5)
        assert 0 <= r_plus_f <= 12
        for row, lab in zip(ids.tolist(), labels.tolist()):
            assert row[0] == 1
            rep = row[-5:]
            # the separator sits right after the first copy of the span, whatever the prefix
            seps = [i for i, t in enumerate(row) if t == 2]
            r = seps[0] - 1 - 5
            assert 0 <= r <= 6 and row[1 + r:1 + r + 5] == rep
            seen.add((r, length - 5 - (seps[0] + 1)))
            assert lab[:-4] == [-100] * (length - 4) and lab[-4:] == rep[1:]
    assert len(seen) > 5  # the prefix and the gap vary from batch to batch


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128))


def test_stages_run_in_order_with_their_own_rows(monkeypatch):
    """pretrain_copy_stages: one pretrain_copy call per stage, each stage's overrides on the common keywords,
    a fresh row stream per stage; steps add up and copy_loss is the last stage's."""
    calls = []
    real = C.pretrain_copy

    def spy(model, vocab_ids, **kw):
        calls.append(kw)
        return real(model, vocab_ids, **kw)

    monkeypatch.setattr(C, "pretrain_copy", spy)
    model = _tiny_llama()
    stats = C.pretrain_copy_stages(model, range(4, 64), [{"steps": 2}, {"steps": 3, "prefix": (0, 4), "gap": (1, 2), "warmup": 0}],
                                   batch_size=4, lr=1e-3, seed=7, span=(2, 5), sep_id=1, warmup=1)
    assert [c["steps"] for c in calls] == [2, 3] and [c["seed"] for c in calls] == [7, 1007]
    assert "prefix" not in calls[0] and calls[1]["prefix"] == (0, 4) and calls[1]["gap"] == (1, 2)
    assert [c["warmup"] for c in calls] == [1, 0] and all(c["span"] == (2, 5) for c in calls)
    assert stats["steps"] == 5 and len(stats["stages"]) == 2
    assert stats["copy_loss"] == stats["stages"][1]["copy_loss"] and stats["first_loss"] == stats["stages"][0]["first_loss"]
    with pytest.raises(ValueError, match="stage"):
        C.pretrain_copy_stages(model, range(4, 64), [])


def test_copy_eval_is_the_mean_loss_on_the_repeated_tokens():
    """copy_eval's numbers against the cross-entropy computed here on the same rows (same generator seed)."""
    import torch.nn.functional as F

    model = _tiny_llama().eval()
    vocab = list(range(4, 64))
    out = C.copy_eval(model, vocab, sep_id=1, bos_id=2, n=8, seed=3)
    g = torch.Generator().manual_seed(3)
    rows = [C.copy_batch(vocab, 8, (16, 16), 1, g, sub_vocab=(4, 1000), bos_id=2),
            C.copy_batch(vocab, 8, (16, 16), 1, g, sub_vocab=(4, 1000), bos_id=2, prefix=(8, 16), gap=(8, 16)),
            C.copy_batch(vocab, 8, (24, 24), 1, g, sub_vocab=(4, 1000), prefix=(8, 16), gap=(8, 16))]
    with torch.no_grad():
        for key, (x, y) in zip(("positional", "content", "content_24_no_bos"), rows):
            logits = model(input_ids=x).logits[:, :-1]
            target = y[:, 1:]
            keep = target != -100
            ref = F.cross_entropy(logits[keep], target[keep]).item()
            assert out[key] == pytest.approx(ref, rel=1e-5), key
    assert set(out) == {"positional", "content", "content_24_no_bos"}


def test_repeat_copy_loss_buckets_the_repeats_token_losses():
    """Against a hand loop: for 'header t sep t', the loss on the repeat's k-th token is -log softmax at the
    position before it; bucket means over k in [2, 3] and [4, 5]."""
    model = _tiny_llama().eval()
    texts, header, sep = [[5, 6, 7, 8, 9], [10, 11, 12, 13]], [3, 4], 1
    out = C.repeat_copy_loss(model, texts, header, sep, buckets=((2, 3), (4, 5)))
    ref = {"2-3": [], "4-5": []}
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([header + t + [sep] + t])
            logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
            start = len(header) + len(t) + 1
            for k in range(2, len(t) + 1):
                p = start + k - 1
                ref["2-3" if k <= 3 else "4-5"].append(-logp[p - 1, ids[0, p]].item())
    assert out == pytest.approx({k: sum(v) / len(v) for k, v in ref.items()}, rel=1e-5)
    assert len(ref["4-5"]) == 3  # k = 4, 5 of the first text, k = 4 of the second
