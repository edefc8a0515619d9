"""GSPO (Zheng et al. 2025, arXiv 2507.18071) against float64 references written from the paper's formulas with
Python loops: the sequence-level objective (eqs. 5-7), the GSPO-token form (eqs. 10-11) in every aggregation,
and the reduction to the token-level PPO loss when every log-prob difference is zero."""
import math

import pytest
import torch

from align import algos

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
MASK = [
    [1, 1, 0, 1, 0, 1],  # padding in the middle
    [1, 1, 1, 1, 1, 1],
    [0, 0, 0, 0, 0, 0],  # no response token
    [1, 1, 1, 0, 0, 0],
    [1, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 0, 0],
]
B, T = len(MASK), len(MASK[0])
ADV_SEQ = [1.5, -2.0, 0.7, -0.4, 0.9, 1.1]


def make_inputs(seed: int, scale: float = 0.05):
    """float64 log-probs whose per-sequence mean log-ratios straddle the clip ranges used below."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.05
    logp = (old + torch.randn(B, T, generator=g, dtype=torch.float64) * scale).requires_grad_(True)
    adv_tok = torch.randn(B, T, generator=g, dtype=torch.float64)
    return logp, old, adv_tok


def ref_seq_ratio(logp, old, i):
    """s_i = exp((1/|y_i|) sum_t (logp_t - old_t)) (eq. 7), from python floats; 1 for an empty row."""
    toks = [t for t in range(T) if MASK[i][t]]
    if not toks:
        return 1.0
    return math.exp(sum(float(logp[i, t].detach()) - float(old[i, t]) for t in toks) / len(toks))


def clip(x, lo, hi):
    return min(max(x, lo), hi)


def ref_gspo_sequence_objective(logp, old, adv, eps_low, eps_high):
    """-J_GSPO = -(1/G) sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i) over rows with tokens
    (eq. 5), written on autograd scalars so its gradient is the paper's eq. 6."""
    terms = []
    for i in range(B):
        toks = [t for t in range(T) if MASK[i][t]]
        if not toks:
            continue
        log_s = sum(logp[i, t] - old[i, t] for t in toks) / len(toks)
        s = torch.exp(log_s)
        a = adv[i]
        terms.append(-torch.minimum(s * a, torch.clamp(s, 1 - eps_low, 1 + eps_high) * a))
    return sum(terms) / len(terms)


def ref_agg(per_token, agg, norm_length=None):
    rows = [[per_token[i][t] for t in range(T) if MASK[i][t]] for i in range(B)]
    if agg == "token-mean":
        toks = [x for r in rows for x in r]
        return sum(toks) / len(toks)
    if agg == "seq-mean-token-mean":
        means = [sum(r) / len(r) for r in rows if r]
        return sum(means) / len(means)
    if agg == "seq-mean-token-sum":
        return sum(sum(r) for r in rows) / B
    return sum(sum(r) for r in rows) / (B * (norm_length or T))


def agg_weight(agg, i):
    counts = [sum(r) for r in MASK]
    if agg == "token-mean":
        return 1 / sum(counts)
    if agg == "seq-mean-token-mean":
        return 1 / (counts[i] * sum(1 for c in counts if c))
    if agg == "seq-mean-token-sum":
        return 1 / B
    return 1 / (B * T)


@pytest.mark.parametrize("eps", [(3e-4, 4e-4), (0.01, 0.02), (0.05, 0.05)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gspo_equals_the_sequence_level_objective(eps, seed):
    """GSPO-token with A_i,t = A_i and seq-mean-token-mean is sequence-level GSPO in value and gradient."""
    logp, old, _ = make_inputs(seed)
    adv = torch.tensor(ADV_SEQ, dtype=torch.float64)
    loss, metrics = algos.gspo_policy_loss(logp, old, adv, torch.tensor(MASK), eps[0], eps[1], agg="seq-mean-token-mean")
    (grad,) = torch.autograd.grad(loss, logp)
    ref = ref_gspo_sequence_objective(logp, old, adv, *eps)
    (ref_grad,) = torch.autograd.grad(ref, logp)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12, abs=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)
    # the sequence ratio of every non-empty row, and which of them clip
    ratios = [ref_seq_ratio(logp, old, i) for i in range(B) if any(MASK[i])]
    assert float(metrics["seq_ratio_mean"]) == pytest.approx(sum(ratios) / len(ratios), rel=1e-12)
    clipped_tokens = sum(
        sum(MASK[i]) for i in range(B) if any(MASK[i])
        and (lambda s, a: -clip(s, 1 - eps[0], 1 + eps[1]) * a > -s * a)(ref_seq_ratio(logp, old, i), ADV_SEQ[i]))
    assert float(metrics["clipfrac"]) == pytest.approx(clipped_tokens / sum(map(sum, MASK)))


def test_some_sequences_clip_and_some_do_not():
    """The fixtures exercise both branches at the paper's ranges (else the test above proves little)."""
    logp, old, _ = make_inputs(0, scale=1e-3)
    s = [ref_seq_ratio(logp, old, i) for i in range(B) if any(MASK[i])]
    outside = [not (1 - 3e-4 <= x <= 1 + 4e-4) for x in s]
    assert any(outside) and not all(outside)
    # A_i with the sign of s_i - 1: a ratio outside the range is then clipped (the pessimistic bound is active)
    adv = torch.tensor([1.0 if ref_seq_ratio(logp, old, i) > 1 else -1.0 for i in range(B)], dtype=torch.float64)
    loss, m = algos.gspo_policy_loss(logp, old, adv, torch.tensor(MASK), 3e-4, 4e-4, agg="seq-mean-token-mean")
    ref = ref_gspo_sequence_objective(logp, old, adv, 3e-4, 4e-4)
    (grad,) = torch.autograd.grad(loss, logp)
    (ref_grad,) = torch.autograd.grad(ref, logp)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)
    rows = [i for i in range(B) if any(MASK[i])]
    want = sum(sum(MASK[i]) for i, out in zip(rows, outside) if out) / sum(map(sum, MASK))
    assert float(m["clipfrac"]) == pytest.approx(want) and 0 < want < 1
    # clipped rows get no gradient
    for i, out in zip(rows, outside):
        assert (grad[i].abs().sum() == 0) == out


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("adv_form", ["seq", "token"])
def test_gspo_token_value_and_gradient_in_every_aggregation(agg, adv_form):
    """eq. 10-11 token by token: L_i,t = max(-A_i,t s_i, -A_i,t clip(s_i)); d L_i,t / d logp_i,t =
    -A_i,t s_i where unclipped, else 0 (s_i,t = sg[s_i] pi / sg[pi] has the value s_i, gradient s_i dlogp)."""
    eps_low, eps_high = 0.01, 0.015
    logp, old, adv_tok = make_inputs(3, scale=0.03)
    adv = torch.tensor(ADV_SEQ, dtype=torch.float64) if adv_form == "seq" else adv_tok
    loss, _ = algos.gspo_policy_loss(logp, old, adv, torch.tensor(MASK), eps_low, eps_high, agg=agg)
    (grad,) = torch.autograd.grad(loss, logp)
    per_token = [[0.0] * T for _ in range(B)]
    want_grad = [[0.0] * T for _ in range(B)]
    for i in range(B):
        s = ref_seq_ratio(logp, old, i)
        for t in range(T):
            if not MASK[i][t]:
                continue
            a = ADV_SEQ[i] if adv_form == "seq" else float(adv_tok[i, t])
            unclipped, clipped = -a * s, -a * clip(s, 1 - eps_low, 1 + eps_high)
            per_token[i][t] = max(unclipped, clipped)
            want_grad[i][t] = (-a * s if unclipped >= clipped else 0.0) * agg_weight(agg, i)
    assert loss.item() == pytest.approx(ref_agg(per_token, agg), rel=1e-12, abs=1e-14)
    torch.testing.assert_close(grad, torch.tensor(want_grad, dtype=torch.float64), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("adv_form", ["seq", "token"])
def test_zero_log_prob_differences_give_the_token_level_loss(agg, adv_form):
    """logp == old_logp: every ratio is 1, and GSPO's loss and gradient are the token-level PPO loss's."""
    _, old, adv_tok = make_inputs(4)
    adv = torch.tensor(ADV_SEQ, dtype=torch.float64) if adv_form == "seq" else adv_tok
    mask = torch.tensor(MASK)
    results = []
    for fn in (algos.policy_loss, algos.gspo_policy_loss):
        logp = old.clone().requires_grad_(True)
        loss, metrics = fn(logp, old, adv, mask, 3e-4, 4e-4, agg=agg)
        (grad,) = torch.autograd.grad(loss, logp)
        results.append((loss.detach(), grad, metrics))
    (tok_loss, tok_grad, tok_m), (seq_loss, seq_grad, seq_m) = results
    torch.testing.assert_close(seq_loss, tok_loss, rtol=0, atol=1e-15)
    torch.testing.assert_close(seq_grad, tok_grad, rtol=0, atol=1e-15)
    assert tok_grad.abs().sum() > 0
    for key in ("clipfrac", "ratio_mean", "ratio_max", "approx_kl"):
        assert float(seq_m[key]) == pytest.approx(float(tok_m[key]), abs=1e-15)


def test_sequence_log_ratio_is_the_length_normalised_sum():
    logp, old, _ = make_inputs(5)
    got = algos.sequence_log_ratio(logp, old, torch.tensor(MASK))
    for i in range(B):
        assert float(got[i].detach()) == pytest.approx(math.log(ref_seq_ratio(logp, old, i)), rel=1e-12, abs=1e-15)


def test_weights_multiply_the_per_token_loss():
    logp, old, _ = make_inputs(6)
    adv = torch.tensor(ADV_SEQ, dtype=torch.float64)
    w = torch.rand(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    mask = torch.tensor(MASK)
    loss, _ = algos.gspo_policy_loss(logp, old, adv, mask, 0.01, 0.01, agg="token-mean", weights=w)
    per_token = [[0.0] * T for _ in range(B)]
    for i in range(B):
        s = ref_seq_ratio(logp, old, i)
        for t in range(T):
            if MASK[i][t]:
                per_token[i][t] = float(w[i, t]) * max(-ADV_SEQ[i] * s, -ADV_SEQ[i] * clip(s, 0.99, 1.01))
    assert loss.item() == pytest.approx(ref_agg(per_token, "token-mean"), rel=1e-12)
    # [B] weights broadcast over tokens
    ws = torch.tensor([0.5, 2.0, 1.0, 0.0, 1.5, 1.0], dtype=torch.float64)
    a, _ = algos.gspo_policy_loss(logp, old, adv, mask, 0.01, 0.01, weights=ws)
    b, _ = algos.gspo_policy_loss(logp, old, adv, mask, 0.01, 0.01, weights=ws[:, None].expand(B, T))
    assert a.item() == b.item()


def test_padding_is_never_read():
    logp, old, _ = make_inputs(7)
    pad = ~torch.tensor(MASK).bool()
    dirty_logp = torch.where(pad, torch.full_like(logp, -float("inf")), logp.detach()).requires_grad_(True)
    dirty_old = torch.where(pad, torch.full_like(old, float("nan")), old)
    adv = torch.tensor(ADV_SEQ, dtype=torch.float64)
    for agg in AGGS:
        clean, _ = algos.gspo_policy_loss(logp, old, adv, torch.tensor(MASK), 0.01, 0.01, agg=agg)
        dirty, m = algos.gspo_policy_loss(dirty_logp, dirty_old, adv, torch.tensor(MASK), 0.01, 0.01, agg=agg)
        (g,) = torch.autograd.grad(dirty, dirty_logp)
        assert dirty.item() == pytest.approx(clean.item(), rel=1e-14)
        assert torch.isfinite(g).all() and (g[pad] == 0).all()
        assert all(torch.isfinite(v) for v in m.values())


def test_bad_arguments_raise_one_line_errors():
    logp, old, _ = make_inputs(8)
    mask = torch.tensor(MASK)
    adv = torch.tensor(ADV_SEQ, dtype=torch.float64)
    for kwargs, words in [({"dual_clip": 3.0}, "dual_clip"), ({"clip_low": 1.5}, "clip_low"),
                          ({"weights": torch.ones(2, 3)}, "weights")]:
        with pytest.raises(ValueError) as err:
            algos.gspo_policy_loss(logp, old, adv, mask, **kwargs)
        assert words in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="advantages"):
        algos.gspo_policy_loss(logp, old, adv[:3], mask)
