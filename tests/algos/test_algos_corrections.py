"""Rollout importance-sampling corrections against float64 references written from the formulas with Python loops:
truncated IS per token (w_t = min(rho_t, C)), masked IS on the sequence ratio (arithmetic: prod_t rho_t;
geometric: exp(mean_t log rho_t)), the mismatch metrics, and the weighted policy loss."""
import math

import pytest
import torch

from align import algos

MASK = [
    [1, 1, 0, 1, 0],
    [1, 1, 1, 1, 1],
    [0, 0, 0, 0, 0],  # no response token
    [1, 1, 1, 0, 0],
    [1, 0, 0, 0, 0],
    [1, 1, 1, 1, 0],
]
B, T = len(MASK), len(MASK[0])


def make(seed: int, scale: float = 0.4):
    g = torch.Generator().manual_seed(seed)
    rollout = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.05
    old = rollout + torch.randn(B, T, generator=g, dtype=torch.float64) * scale
    return old, rollout


def toks(i):
    return [t for t in range(T) if MASK[i][t]]


def rho(old, rollout, i, t):
    return math.exp(float(old[i, t]) - float(rollout[i, t]))


def ref_seq_ratio(old, rollout, i, form):
    logs = [float(old[i, t]) - float(rollout[i, t]) for t in toks(i)]
    if not logs:
        return 1.0
    return math.exp(sum(logs)) if form == "arithmetic" else math.exp(sum(logs) / len(logs))


def ref_quantile(values, q):
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


@pytest.mark.parametrize("cap", [1.0, 1.2, 2.0, 5.0])
def test_token_tis_weights(cap):
    old, rollout = make(0)
    w = algos.token_tis_weights(old, rollout, torch.tensor(MASK), cap)
    for i in range(B):
        for t in range(T):
            want = min(rho(old, rollout, i, t), cap) if MASK[i][t] else 0.0
            assert float(w[i, t]) == pytest.approx(want, rel=1e-13, abs=0)
    assert not w.requires_grad


@pytest.mark.parametrize("form", ["arithmetic", "geometric"])
@pytest.mark.parametrize("lo,hi", [(0.0, 3.0), (1 / 3, 3.0), (0.5, 1.5), (0.9, 1.1), (1.0, 1.0)])
def test_seq_mis_weights(form, lo, hi):
    old, rollout = make(1)
    w, ratio = algos.seq_mis_weights(old, rollout, torch.tensor(MASK), lo, hi, form)
    assert w.shape == (B,) and ratio.shape == (B,)
    for i in range(B):
        r = ref_seq_ratio(old, rollout, i, form)
        assert float(ratio[i]) == pytest.approx(r, rel=1e-12)
        inside = lo <= r <= hi
        want = (r if form == "arithmetic" else 1.0) if inside else 0.0
        assert float(w[i]) == pytest.approx(want, rel=1e-12, abs=0)


def test_the_fixtures_mask_some_sequences_and_keep_others():
    old, rollout = make(0)
    for form, (lo, hi) in (("arithmetic", (1 / 3, 3.0)), ("geometric", (0.9, 1.1))):
        ratios = [ref_seq_ratio(old, rollout, i, form) for i in range(B) if toks(i)]
        kept = [lo <= r <= hi for r in ratios]
        assert any(kept) and not all(kept), form


@pytest.mark.parametrize("mode", ["none", "token_tis", "seq_mis", "seq_mis_geo"])
def test_rollout_correction_weights_and_metrics(mode):
    old, rollout = make(0)
    cap, lo, hi = 1.5, 0.5, 2.0
    if mode == "seq_mis_geo":
        lo, hi = 0.9, 1.1
    weights, m = algos.rollout_correction(old, rollout, torch.tensor(MASK), mode, cap=cap, lo=lo, hi=hi)
    response = [(i, t) for i in range(B) for t in toks(i)]
    rhos = {(i, t): rho(old, rollout, i, t) for i, t in response}
    # k3 estimate of KL(rollout || old) from the rollout's samples: rho - 1 - log rho
    want_kl = sum(r - 1 - math.log(r) for r in rhos.values()) / len(rhos)
    assert float(m["kl_k3"]) == pytest.approx(want_kl, rel=1e-12)
    if mode in ("none", "token_tis"):
        thresholded = list(rhos.values())
    else:
        form = "arithmetic" if mode == "seq_mis" else "geometric"
        thresholded = [ref_seq_ratio(old, rollout, i, form) for i in range(B) if toks(i)]
    for name, q in (("ratio_p50", 0.5), ("ratio_p95", 0.95), ("ratio_max", 1.0), ("ratio_min", 0.0)):
        assert float(m[name]) == pytest.approx(ref_quantile(thresholded, q), rel=1e-12), name
    if mode == "none":
        assert weights is None and float(m["weight_mean"]) == 1.0
        return
    want_w = [[0.0] * T for _ in range(B)]
    for i, t in response:
        if mode == "token_tis":
            want_w[i][t] = min(rhos[(i, t)], cap)
        else:
            r = ref_seq_ratio(old, rollout, i, form)
            want_w[i][t] = (r if form == "arithmetic" else 1.0) if lo <= r <= hi else 0.0
    torch.testing.assert_close(weights, torch.tensor(want_w, dtype=torch.float64), rtol=1e-12, atol=0)
    assert float(m["weight_mean"]) == pytest.approx(sum(want_w[i][t] for i, t in response) / len(response), rel=1e-12)
    if mode == "token_tis":
        share = sum(r > cap for r in rhos.values()) / len(rhos)
        assert float(m["capped_share"]) == pytest.approx(share) and 0 < share < 1
    else:
        rows = [i for i in range(B) if toks(i)]
        share = sum(not (lo <= thresholded[k] <= hi) for k, _ in enumerate(rows)) / len(rows)
        assert float(m["masked_share"]) == pytest.approx(share) and 0 < share < 1
    for value in m.values():
        assert value.dim() == 0 and not value.requires_grad


@pytest.mark.parametrize("mode", ["token_tis", "seq_mis", "seq_mis_geo"])
def test_agreeing_engines_give_unit_weights(mode):
    _, rollout = make(3)
    weights, m = algos.rollout_correction(rollout.clone(), rollout, torch.tensor(MASK), mode, cap=2.0, lo=0.999, hi=1.001)
    assert torch.equal(weights, torch.tensor(MASK, dtype=torch.float64))
    assert float(m["kl_k3"]) == 0.0 and float(m["ratio_max"]) == 1.0 and float(m["weight_mean"]) == 1.0
    assert float(m.get("masked_share", 0.0)) == 0.0 and float(m.get("capped_share", 0.0)) == 0.0


def test_padding_is_never_read():
    old, rollout = make(4)
    pad = ~torch.tensor(MASK).bool()
    dirty_old = torch.where(pad, torch.full_like(old, float("nan")), old)
    dirty_roll = torch.where(pad, torch.full_like(rollout, -float("inf")), rollout)
    for mode in ("token_tis", "seq_mis", "seq_mis_geo"):
        clean_w, clean_m = algos.rollout_correction(old, rollout, torch.tensor(MASK), mode, lo=0.5, hi=2.0)
        w, m = algos.rollout_correction(dirty_old, dirty_roll, torch.tensor(MASK), mode, lo=0.5, hi=2.0)
        assert torch.equal(w, clean_w) and (w[pad] == 0).all()
        assert all(float(m[k]) == float(clean_m[k]) for k in m)


def test_huge_mismatch_stays_finite():
    rollout = torch.full((2, 400), -5.0)
    old = torch.full((2, 400), -0.1)  # rho_t = e^4.9 per token, product e^1960
    mask = torch.ones(2, 400)
    for mode in ("token_tis", "seq_mis", "seq_mis_geo"):
        w, m = algos.rollout_correction(old, rollout, mask, mode, cap=2.0, lo=0.5, hi=2.0)
        assert torch.isfinite(w).all() and all(math.isfinite(float(v)) for v in m.values())
    w, m = algos.rollout_correction(old, rollout, mask, "seq_mis", lo=0.5, hi=2.0)
    assert float(w.sum()) == 0.0 and float(m["masked_share"]) == 1.0


def test_bad_arguments_raise_one_line_errors():
    old, rollout = make(5)
    mask = torch.tensor(MASK)
    cases = [
        (lambda: algos.rollout_correction(old, rollout, mask, "tis"), "mode"),
        (lambda: algos.token_tis_weights(old, rollout, mask, cap=0.0), "cap"),
        (lambda: algos.seq_mis_weights(old, rollout, mask, lo=1.5, hi=2.0), "lo"),
        (lambda: algos.seq_mis_weights(old, rollout, mask, lo=0.5, hi=0.9), "hi"),
        (lambda: algos.seq_mis_weights(old, rollout, mask, lo=0.5, hi=2.0, form="harmonic"), "form"),
        (lambda: algos.token_tis_weights(old, rollout[:, :3], mask), "shape"),
    ]
    for call, word in cases:
        with pytest.raises(ValueError) as err:
            call()
        assert word in str(err.value) and "\n" not in str(err.value)


AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("agg", AGGS)
def test_policy_loss_with_weights_matches_the_reference(agg):
    """sum over tokens of w_t * max(-A r_t, -A clip(r_t)), aggregated; the gradient is w_t times the token's."""
    g = torch.Generator().manual_seed(6)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    logp = (old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3).requires_grad_(True)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    w = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    loss, _ = algos.policy_loss(logp, old, adv, torch.tensor(MASK), 0.2, 0.28, agg=agg, weights=w)
    (grad,) = torch.autograd.grad(loss, logp)
    counts = [len(toks(i)) for i in range(B)]
    n_rows = sum(1 for c in counts if c)
    total, want_grad = 0.0, [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in toks(i):
            r, a = math.exp(float(logp[i, t].detach()) - float(old[i, t])), float(adv[i])
            un, cl = -a * r, -a * min(max(r, 0.8), 1.28)
            scale = {"token-mean": 1 / sum(counts), "seq-mean-token-mean": 1 / (counts[i] * n_rows),
                     "seq-mean-token-sum": 1 / B, "seq-mean-token-sum-norm": 1 / (B * T)}[agg]
            total += float(w[i, t]) * max(un, cl) * scale
            want_grad[i][t] = float(w[i, t]) * (-a * r if un >= cl else 0.0) * scale
    assert loss.item() == pytest.approx(total, rel=1e-12)
    torch.testing.assert_close(grad, torch.tensor(want_grad, dtype=torch.float64), rtol=1e-10, atol=1e-15)


def test_unit_weights_change_nothing():
    old, rollout = make(7, scale=0.1)
    logp = rollout.clone().requires_grad_(True)
    adv = torch.randn(B, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor(MASK)
    plain, pm = algos.policy_loss(logp, old, adv, mask)
    ones, om = algos.policy_loss(logp, old, adv, mask, weights=torch.ones(B, dtype=torch.float64))
    assert plain.item() == ones.item() and all(float(pm[k]) == float(om[k]) for k in pm)
