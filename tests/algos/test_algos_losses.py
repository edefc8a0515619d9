"""policy_loss / value_loss / aggregate vs per-token Python references in float64, plus gradients."""
import math

import pytest
import torch

from align import algos

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]

MASK = [
    [1, 1, 0, 1, 0],  # padding in the middle
    [1, 1, 1, 1, 1],
    [0, 0, 0, 0, 0],  # no response token
    [1, 1, 1, 0, 0],
]
# log-ratios spread over [-0.9, 0.9] so both clip bounds and the dual clip are hit
LOG_RATIO = [
    [0.05, -0.9, 0.3, 0.6, -0.2],
    [-0.4, 0.15, 0.9, -0.05, 0.25],
    [0.1, 0.2, -0.3, 0.4, -0.5],
    [1.2, -0.25, 0.02, 0.7, -0.6],
]
ADV_SEQ = [1.5, -2.0, 0.7, -0.4]
ADV_TOK = [
    [1.0, -1.0, 3.0, 0.5, 2.0],
    [-2.0, 0.3, -0.7, 1.1, -0.2],
    [0.4, 0.4, 0.4, 0.4, 0.4],
    [-1.5, 2.0, 0.0, -1.0, 1.0],
]


def ref_agg(per_token, mask, agg, norm_length=None):
    B, T = len(mask), len(mask[0])
    rows = [[per_token[i][t] for t in range(T) if mask[i][t]] for i in range(B)]
    if agg == "token-mean":
        toks = [x for row in rows for x in row]
        return sum(toks) / len(toks) if toks else 0.0
    if agg == "seq-mean-token-mean":
        means = [sum(r) / len(r) for r in rows if r]
        return sum(means) / len(means) if means else 0.0
    if agg == "seq-mean-token-sum":
        return sum(sum(r) for r in rows) / B
    return sum(sum(r) for r in rows) / (B * (norm_length or T))


def ref_pg_token(lr, a, clip_low, clip_high, dual_clip):
    """Returns (loss, d loss / d logp, clip_active, dual_active) for one token."""
    r = math.exp(lr)
    pg1 = -a * r
    pg2 = -a * min(max(r, 1 - clip_low), 1 + clip_high)
    loss, grad = (pg1, -a * r) if pg1 >= pg2 else (pg2, 0.0)
    dual = False
    if dual_clip is not None and a < 0 and -dual_clip * a < loss:
        loss, grad, dual = -dual_clip * a, 0.0, True
    return loss, grad, pg2 > pg1, dual


def agg_weights(mask, agg, norm_length=None):
    """d aggregate / d per_token[i][t] for each token (the aggregations are linear)."""
    B, T = len(mask), len(mask[0])
    counts = [sum(row) for row in mask]
    n_tok, n_rows = sum(counts), sum(1 for c in counts if c)
    w = [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in range(T):
            if not mask[i][t]:
                continue
            if agg == "token-mean":
                w[i][t] = 1 / n_tok
            elif agg == "seq-mean-token-mean":
                w[i][t] = 1 / (counts[i] * n_rows)
            elif agg == "seq-mean-token-sum":
                w[i][t] = 1 / B
            else:
                w[i][t] = 1 / (B * (norm_length or T))
    return w


def _inputs(adv_form, dtype=torch.float64):
    old = torch.linspace(-3.0, -0.1, 20, dtype=dtype).reshape(4, 5)
    logp = (old + torch.tensor(LOG_RATIO, dtype=dtype)).requires_grad_(True)
    adv = torch.tensor(ADV_SEQ if adv_form == "seq" else ADV_TOK, dtype=dtype)
    return logp, old, adv


def _adv_at(adv_form, i, t):
    return ADV_SEQ[i] if adv_form == "seq" else ADV_TOK[i][t]


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip_low,clip_high", [(0.2, 0.2), (0.2, 0.28), (0.1, 0.5)])
@pytest.mark.parametrize("dual_clip", [None, 1.5, 3.0])
@pytest.mark.parametrize("adv_form", ["seq", "token"])
def test_policy_loss_value_grad_and_metrics(agg, clip_low, clip_high, dual_clip, adv_form):
    logp, old, adv = _inputs(adv_form)
    loss, metrics = algos.policy_loss(
        logp, old, adv, torch.tensor(MASK), clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg
    )
    per_tok, grads, clips, duals = [], [], [], []
    for i in range(4):
        row_l, row_g = [], []
        for t in range(5):
            l_, g_, c_, d_ = ref_pg_token(LOG_RATIO[i][t], _adv_at(adv_form, i, t), clip_low, clip_high, dual_clip)
            row_l.append(l_)
            row_g.append(g_)
            if MASK[i][t]:
                clips.append(c_)
                duals.append(d_)
        per_tok.append(row_l)
        grads.append(row_g)
    assert loss.item() == pytest.approx(ref_agg(per_tok, MASK, agg), rel=1e-12, abs=1e-12)

    loss.backward()
    w = agg_weights(MASK, agg)
    want_grad = [[w[i][t] * grads[i][t] for t in range(5)] for i in range(4)]
    torch.testing.assert_close(logp.grad, torch.tensor(want_grad, dtype=torch.float64), rtol=1e-10, atol=1e-12)

    assert float(metrics["clipfrac"]) == pytest.approx(sum(clips) / len(clips))
    assert float(metrics["dual_clip_frac"]) == pytest.approx(sum(duals) / len(duals))
    ratios = [math.exp(LOG_RATIO[i][t]) for i in range(4) for t in range(5) if MASK[i][t]]
    assert float(metrics["ratio_mean"]) == pytest.approx(sum(ratios) / len(ratios))
    assert float(metrics["ratio_max"]) == pytest.approx(max(ratios))
    lrs = [LOG_RATIO[i][t] for i in range(4) for t in range(5) if MASK[i][t]]
    assert float(metrics["approx_kl"]) == pytest.approx(sum(0.5 * x * x for x in lrs) / len(lrs))
    for value in metrics.values():
        assert value.dim() == 0 and not value.requires_grad


def test_policy_loss_hand_cases_clip_and_dual_clip():
    mask = torch.ones(1, 4)
    old = torch.zeros(1, 4, dtype=torch.float64)
    logp = torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.5]], dtype=torch.float64))
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
    loss, m = algos.policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    # tokens: A=+1,r=1.5 -> -1.2 (clipped); A=+1,r=.5 -> -0.5; A=-1,r=.5 -> 0.8 (clipped); A=-1,r=1.5 -> 1.5
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4)
    assert float(m["clipfrac"]) == 0.5 and float(m["clipfrac_high"]) == 0.25 and float(m["clipfrac_low"]) == 0.25

    # dual clip: A = -1, r = e^2 ~ 7.39; c = 3 caps the loss at 3 (active), c = 10 leaves 7.39 (inactive)
    logp = torch.tensor([[2.0]], dtype=torch.float64)
    old, adv, mask = torch.zeros(1, 1, dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64), torch.ones(1, 1)
    active, m_active = algos.policy_loss(logp, old, adv, mask, dual_clip=3.0)
    inactive, m_inactive = algos.policy_loss(logp, old, adv, mask, dual_clip=10.0)
    plain, _ = algos.policy_loss(logp, old, adv, mask)
    assert active.item() == pytest.approx(3.0)
    assert inactive.item() == pytest.approx(math.exp(2.0)) and plain.item() == pytest.approx(math.exp(2.0))
    assert float(m_active["dual_clip_frac"]) == 1.0 and float(m_inactive["dual_clip_frac"]) == 0.0
    # the dual clip never touches positive advantages
    pos, _ = algos.policy_loss(logp, old, -adv, mask, dual_clip=3.0)
    assert pos.item() == pytest.approx(-1.2)


def test_policy_loss_gradcheck_finite_differences():
    logp, old, adv = _inputs("token")
    logp = logp.detach().requires_grad_(True)
    mask = torch.tensor(MASK)
    for agg in AGGS:
        assert torch.autograd.gradcheck(
            lambda lp: algos.policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0, agg=agg)[0],
            (logp,),
        )


@pytest.mark.parametrize("agg", AGGS)
def test_seq_and_broadcast_advantages_agree(agg):
    logp, old, _ = _inputs("seq")
    adv_seq = torch.tensor(ADV_SEQ, dtype=torch.float64)
    a, _ = algos.policy_loss(logp, old, adv_seq, torch.tensor(MASK), agg=agg)
    b, _ = algos.policy_loss(logp, old, adv_seq[:, None].expand(4, 5), torch.tensor(MASK), agg=agg)
    assert a.item() == b.item()


def test_policy_loss_nan_safety():
    # -inf log-probs and NaN advantages on padding, an all-padding row: loss and gradient stay finite
    logp = torch.tensor([[-0.5, -float("inf"), -1.0], [-float("inf")] * 3], requires_grad=True)
    old = torch.tensor([[-0.4, -float("inf"), -1.2], [-float("inf")] * 3])
    adv = torch.tensor([[1.0, float("nan"), -1.0], [float("nan")] * 3])
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]])
    for agg in AGGS:
        logp.grad = None
        loss, metrics = algos.policy_loss(logp, old, adv, mask, agg=agg, dual_clip=2.0)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
        assert (logp.grad[mask == 0] == 0).all()
        assert all(math.isfinite(float(v)) for v in metrics.values())
    empty_loss, empty_metrics = algos.policy_loss(logp, old, adv, torch.zeros(2, 3), agg="seq-mean-token-mean")
    assert empty_loss.item() == 0.0 and all(float(v) == 0.0 for v in empty_metrics.values())
    # huge but finite log-ratio with A = 0: exp would overflow without the clamp, 0 * inf = NaN
    huge, _ = algos.policy_loss(torch.tensor([[500.0]]), torch.tensor([[0.0]]), torch.tensor([0.0]), torch.ones(1, 1))
    assert torch.isfinite(huge)


def test_policy_loss_validation():
    z = torch.zeros(2, 3)
    m = torch.ones(2, 3)
    with pytest.raises(ValueError, match="shape"):
        algos.policy_loss(z, torch.zeros(2, 4), z, m)
    with pytest.raises(ValueError, match="advantages"):
        algos.policy_loss(z, z, torch.zeros(3), m)
    with pytest.raises(ValueError, match="shape"):
        algos.policy_loss(z, z, torch.zeros(3, 3), m)
    with pytest.raises(ValueError, match="dual_clip"):
        algos.policy_loss(z, z, z, m, dual_clip=0.5)
    with pytest.raises(ValueError, match="clip_low"):
        algos.policy_loss(z, z, z, m, clip_low=-0.1)
    with pytest.raises(ValueError, match="aggregation"):
        algos.policy_loss(z, z, z, m, agg="mean")


@pytest.mark.parametrize("agg", AGGS)
def test_aggregate_modes(agg):
    g = torch.Generator().manual_seed(3)
    loss = torch.randn(4, 5, generator=g, dtype=torch.float64)
    loss[2, 0] = float("nan")  # padding value must not be read
    got = algos.aggregate(loss, torch.tensor(MASK), agg)
    assert got.item() == pytest.approx(ref_agg(loss.tolist(), MASK, agg), rel=1e-12)


def test_aggregate_hand_values_and_norm_length():
    loss = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert algos.aggregate(loss, mask, "token-mean").item() == pytest.approx(20 / 5)
    assert algos.aggregate(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2.5 + 10) / 2)
    assert algos.aggregate(loss, mask, "seq-mean-token-sum").item() == pytest.approx(20 / 3)
    assert algos.aggregate(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(20 / (3 * 4))
    assert algos.aggregate(loss, mask, "seq-mean-token-sum-norm", norm_length=10).item() == pytest.approx(20 / 30)
    with pytest.raises(ValueError, match="norm_length"):
        algos.aggregate(loss, mask, "token-mean", norm_length=10)
    for agg in AGGS:
        assert algos.aggregate(loss, torch.zeros(3, 4), agg).item() == 0.0


@pytest.mark.parametrize("agg", AGGS)
def test_global_denom_makes_micro_batches_sum_to_the_full_loss(agg):
    logp, old, adv = _inputs("token")
    mask = torch.tensor(MASK)
    full, _ = algos.policy_loss(logp, old, adv, mask, clip_high=0.28, agg=agg)
    counts = mask.sum(-1)
    denom = {
        "token-mean": counts.sum().item(),
        "seq-mean-token-mean": (counts > 0).sum().item(),
        "seq-mean-token-sum": 4,
        "seq-mean-token-sum-norm": 4,
    }[agg]
    parts = [
        algos.policy_loss(logp[s], old[s], adv[s], mask[s], clip_high=0.28, agg=agg, global_denom=denom)[0]
        for s in (slice(0, 1), slice(1, 3), slice(3, 4))
    ]
    assert sum(p.item() for p in parts) == pytest.approx(full.item(), rel=1e-12)


def ref_value_token(v, old, ret, clip):
    unclipped = (v - ret) ** 2
    if clip is None:
        return 0.5 * unclipped, False
    clipped = (old + min(max(v - old, -clip), clip) - ret) ** 2
    return 0.5 * max(unclipped, clipped), clipped > unclipped


VALUES = [[0.5, 1.0, 9.0, -0.3, 9.0], [0.0, 0.2, 0.4, 0.6, 0.8], [1.0, 1.0, 1.0, 1.0, 1.0], [2.0, -1.0, 0.3, 0, 0]]
OLD_VALUES = [[0.2, 1.3, 0.0, -0.2, 0.0], [0.5, 0.0, 0.45, 0.3, 1.5], [0.0, 0.0, 0.0, 0.0, 0.0], [1.0, -1.1, 0.0, 0, 0]]
RETURNS = [[1.0, 0.0, 5.0, 0.1, 5.0], [0.4, 0.5, 0.3, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0], [1.5, 0.0, 0.2, 0, 0]]


@pytest.mark.parametrize("clip", [None, 0.05, 0.2, 100.0])
@pytest.mark.parametrize("agg", AGGS)
def test_value_loss_matches_reference(clip, agg):
    values = torch.tensor(VALUES, dtype=torch.float64, requires_grad=True)
    loss, metrics = algos.value_loss(
        values, torch.tensor(OLD_VALUES, dtype=torch.float64), torch.tensor(RETURNS, dtype=torch.float64),
        torch.tensor(MASK), clip=clip, agg=agg,
    )
    per_tok, clipped = [], []
    for i in range(4):
        row = []
        for t in range(5):
            l_, c_ = ref_value_token(VALUES[i][t], OLD_VALUES[i][t], RETURNS[i][t], clip)
            row.append(l_)
            if MASK[i][t]:
                clipped.append(c_)
        per_tok.append(row)
    assert loss.item() == pytest.approx(ref_agg(per_tok, MASK, agg), rel=1e-12)
    assert float(metrics["vf_clipfrac"]) == pytest.approx(sum(clipped) / len(clipped))
    if clip in (None, 100.0):
        assert float(metrics["vf_clipfrac"]) == 0.0
    if clip == 0.05:
        assert float(metrics["vf_clipfrac"]) > 0.0
    loss.backward()
    # gradient: (v - R) * weight where the unclipped branch is active, 0 where the clipped one is
    w = agg_weights(MASK, agg)
    k = 0
    for i in range(4):
        for t in range(5):
            want = 0.0
            if MASK[i][t]:
                want = 0.0 if clipped[k] else w[i][t] * (VALUES[i][t] - RETURNS[i][t])
                k += 1
            assert values.grad[i, t].item() == pytest.approx(want, abs=1e-12)


def test_value_loss_hand_case_and_metrics():
    v = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    old = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    ret = torch.tensor([[2.0, 1.0]], dtype=torch.float64)
    loss, m = algos.value_loss(v, old, ret, torch.ones(1, 2), clip=0.2)
    # token 0: max((1-2)^2, (0.2-2)^2) = 3.24; token 1: (0-1)^2 = 1 both ways
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.0) / 2)
    assert float(m["vf_clipfrac"]) == 0.5
    assert float(m["value_mean"]) == 0.5 and float(m["returns_mean"]) == 1.5
    # explained variance = 1 - Var(R - v) / Var(R) = 1 - Var([1, 1]) / Var([2, 1]) = 1
    assert float(m["explained_variance"]) == pytest.approx(1.0)
    _, m2 = algos.value_loss(v, old, torch.full((1, 2), 3.0, dtype=torch.float64), torch.ones(1, 2))
    assert float(m2["explained_variance"]) == 0.0  # constant returns: defined as 0, not NaN
    with pytest.raises(ValueError, match="clip"):
        algos.value_loss(v, old, ret, torch.ones(1, 2), clip=-1.0)
    with pytest.raises(ValueError, match="shape"):
        algos.value_loss(v, old, ret, torch.ones(2, 2))


def test_bf16_inputs_are_computed_in_float32_and_grad_reaches_bf16():
    logp64, old64, adv = _inputs("token")
    logp = logp64.detach().to(torch.bfloat16).requires_grad_(True)
    old = old64.to(torch.bfloat16)
    loss, metrics = algos.policy_loss(logp, old, adv.to(torch.bfloat16), torch.tensor(MASK))
    assert loss.dtype == torch.float32 and metrics["clipfrac"].dtype == torch.float32
    # reference on the same (bf16-rounded) inputs in float64
    ref, _ = algos.policy_loss(logp.detach().double(), old.double(), adv.to(torch.bfloat16).double(), torch.tensor(MASK))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()
    assert logp.grad.dtype == torch.bfloat16 and torch.isfinite(logp.grad.float()).all()
    v, _ = algos.value_loss(torch.ones(2, 2, dtype=torch.bfloat16), torch.zeros(2, 2), torch.zeros(2, 2), torch.ones(2, 2))
    assert v.dtype == torch.float32 and v.item() == pytest.approx(0.5)  # max(1^2, 0.2^2) / 2
