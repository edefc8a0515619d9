"""KL estimators vs per-element math formulas; KL controllers vs hand-computed trajectories."""
import copy
import math

import pytest
import torch

from align import algos

LOGP = [[-0.5, -1.2, -3.0, -0.01], [-2.0, -0.7, -0.2, -25.0]]
REF = [[-0.6, -0.9, -1.0, -0.01], [-4.0, -0.7, -30.0, -1.0]]


def ref_kl(lp, rf, kind):
    d = lp - rf
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "abs":
        return abs(d)
    if kind == "k3":
        return math.exp(-d) - (-d) - 1
    if kind == "low_var_kl":
        x = min(max(rf - lp, -20.0), 20.0)
        return min(max(math.exp(x) - x - 1, -10.0), 10.0)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "abs", "low_var_kl"])
def test_kl_kinds_match_formulas(kind):
    got = algos.kl_penalty(torch.tensor(LOGP, dtype=torch.float64), torch.tensor(REF, dtype=torch.float64), kind)
    assert got.shape == (2, 4)
    for i in range(2):
        for j in range(4):
            assert got[i, j].item() == pytest.approx(ref_kl(LOGP[i][j], REF[i][j], kind), rel=1e-12, abs=1e-12)


def test_kl_hand_values_and_properties():
    lp = torch.tensor([[math.log(0.5)]], dtype=torch.float64)
    rf = torch.tensor([[math.log(0.25)]], dtype=torch.float64)
    d = math.log(2.0)
    assert algos.kl_penalty(lp, rf, "k1").item() == pytest.approx(d)
    assert algos.kl_penalty(lp, rf, "k2").item() == pytest.approx(0.5 * d * d)
    assert algos.kl_penalty(lp, rf, "k3").item() == pytest.approx(0.5 - (-d) - 1)  # ratio ref/p = 0.5
    assert algos.kl_penalty(rf, lp, "abs").item() == pytest.approx(d)
    # k2, k3, abs are >= 0 and 0 where logp == ref
    x = torch.randn(50, dtype=torch.float64)
    y = torch.randn(50, dtype=torch.float64)
    for kind in ("k2", "k3", "abs", "low_var_kl"):
        assert (algos.kl_penalty(x, y, kind) >= 0).all()
        assert torch.equal(algos.kl_penalty(x, x, kind), torch.zeros(50, dtype=torch.float64))


def test_low_var_kl_is_clamped_and_k3_is_not():
    lp = torch.tensor([-30.0])
    rf = torch.tensor([-1.0])
    assert algos.kl_penalty(lp, rf, "low_var_kl").item() == 10.0
    assert algos.kl_penalty(lp, rf, "k3").item() > 1e10


def test_kl_gradient_of_k3():
    lp = torch.tensor([-0.3, -2.0], dtype=torch.float64, requires_grad=True)
    rf = torch.tensor([-1.0, -1.5], dtype=torch.float64)
    algos.kl_penalty(lp, rf, "k3").sum().backward()
    # d/dlogp [exp(rf - lp) - (rf - lp) - 1] = 1 - exp(rf - lp)
    want = [1 - math.exp(-1.0 + 0.3), 1 - math.exp(-1.5 + 2.0)]
    assert lp.grad.tolist() == pytest.approx(want)


def test_kl_validation():
    with pytest.raises(ValueError, match="unknown KL kind"):
        algos.kl_penalty(torch.zeros(2), torch.zeros(2), "k4")
    with pytest.raises(ValueError, match="shape"):
        algos.kl_penalty(torch.zeros(2, 3), torch.zeros(2, 4), "k1")


def test_fixed_controller():
    ctl = algos.FixedKLController(0.05)
    assert ctl.value == 0.05
    assert ctl.update(3.0, 64) == 0.05 and ctl.value == 0.05
    other = algos.FixedKLController(0.1)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05
    with pytest.raises(ValueError, match="coef"):
        algos.FixedKLController(-1.0)


def test_adaptive_controller_trajectory_matches_hand_computation():
    ctl = algos.AdaptiveKLController(init_coef=0.2, target=6.0, horizon=10000)
    steps = [(6.6, 256), (12.0, 256), (1.0, 512), (6.0, 128), (5.4, 256)]
    # error = clip(kl / 6 - 1, -0.2, 0.2)
    expected = []
    v = 0.2
    for err, n in [(0.1, 256), (0.2, 256), (-0.2, 512), (0.0, 128), (-0.1, 256)]:
        v = v * (1 + err * n / 10000)
        expected.append(v)
    got = [ctl.update(kl, n) for kl, n in steps]
    assert got == pytest.approx(expected, rel=1e-12)
    assert ctl.value == pytest.approx(0.2 * 1.00256 * 1.00512 * (1 - 0.01024) * 1.0 * (1 - 0.00256), rel=1e-12)
    # tensors are accepted as current_kl
    before = ctl.value
    ctl.update(torch.tensor(7.2), 100)
    assert ctl.value == pytest.approx(before * (1 + 0.2 * 100 / 10000))


def test_adaptive_controller_state_dict_round_trip_gives_identical_continuation():
    a = algos.AdaptiveKLController(0.1, target=2.0, horizon=1000)
    for kl in (2.5, 3.1, 0.4):
        a.update(kl, 64)
    state = copy.deepcopy(a.state_dict())
    assert state == {"kind": "adaptive", "value": a.value, "target": 2.0, "horizon": 1000.0}
    b = algos.AdaptiveKLController(0.1, target=2.0, horizon=1000)
    b.load_state_dict(state)
    assert b.value == a.value
    for kl in (1.7, 2.9, 0.1):
        assert b.update(kl, 64) == a.update(kl, 64)  # bitwise identical
    with pytest.raises(ValueError, match="state is for"):
        algos.FixedKLController(0.1).load_state_dict(state)


def test_adaptive_controller_validation_and_floor():
    with pytest.raises(ValueError, match="target"):
        algos.AdaptiveKLController(0.1, 0.0, 100)
    with pytest.raises(ValueError, match="horizon"):
        algos.AdaptiveKLController(0.1, 1.0, 0)
    ctl = algos.AdaptiveKLController(0.1, 1.0, 10)
    with pytest.raises(ValueError, match="finite"):
        ctl.update(float("nan"), 1)
    with pytest.raises(ValueError, match="n_steps"):
        ctl.update(1.0, 0)
    ctl.update(0.0, 100)  # factor 1 - 0.2 * 10 < 0 -> floored at 0
    assert ctl.value == 0.0
