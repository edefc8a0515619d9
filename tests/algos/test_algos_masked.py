"""masked_* reductions vs plain Python loops in float64."""
import math

import pytest
import torch

from align import algos

X = [[1.0, 2.0, 3.0, 4.0, 5.0], [-1.0, 0.5, 7.0, 2.0, 9.0], [3.0, 3.0, 3.0, 3.0, 3.0]]
M = [[1, 1, 0, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]


def _selected(x, m):
    return [xi for row_x, row_m in zip(x, m) for xi, mi in zip(row_x, row_m) if mi]


def _ref_var(vals, unbiased):
    n = len(vals)
    if n == 0 or (unbiased and n < 2):
        return 0.0
    mu = sum(vals) / n
    return sum((v - mu) ** 2 for v in vals) / (n - 1 if unbiased else n)


def _t(data, dtype=torch.float64):
    return torch.tensor(data, dtype=dtype)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
def test_masked_sum_and_mean_whole_tensor(mask_dtype):
    x, m = _t(X), _t(M).to(mask_dtype)
    sel = _selected(X, M)
    assert algos.masked_sum(x, m).item() == pytest.approx(sum(sel))
    assert algos.masked_mean(x, m).item() == pytest.approx(sum(sel) / len(sel))


def test_masked_mean_per_row_and_empty_row_is_zero():
    out = algos.masked_mean(_t(X), _t(M), dim=-1)
    expected = []
    for row_x, row_m in zip(X, M):
        vals = [xi for xi, mi in zip(row_x, row_m) if mi]
        expected.append(sum(vals) / len(vals) if vals else 0.0)
    assert out.tolist() == pytest.approx(expected)
    assert algos.masked_mean(_t(X), torch.zeros(3, 5)).item() == 0.0


def test_masked_mean_per_column():
    out = algos.masked_mean(_t(X), _t(M), dim=0)
    expected = []
    for j in range(5):
        vals = [X[i][j] for i in range(3) if M[i][j]]
        expected.append(sum(vals) / len(vals) if vals else 0.0)
    assert out.tolist() == pytest.approx(expected)


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var(unbiased):
    sel = _selected(X, M)
    assert algos.masked_var(_t(X), _t(M), unbiased=unbiased).item() == pytest.approx(_ref_var(sel, unbiased))
    per_row = algos.masked_var(_t(X), _t(M), unbiased=unbiased, dim=1).tolist()
    for got, row_x, row_m in zip(per_row, X, M):
        assert got == pytest.approx(_ref_var([a for a, b in zip(row_x, row_m) if b], unbiased))


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_formula(shift_mean, unbiased):
    # unbiased=False is the biased variance the released CD-RLHF `whiten` uses for the intrinsic reward
    sel = _selected(X, M)
    mu = sum(sel) / len(sel)
    var = _ref_var(sel, unbiased=unbiased)
    out = algos.masked_whiten(_t(X), _t(M), shift_mean=shift_mean, unbiased=unbiased)
    for i in range(3):
        for j in range(5):
            if M[i][j]:
                want = (X[i][j] - mu) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mu)
            else:
                want = 0.0
            assert out[i, j].item() == pytest.approx(want, rel=1e-9, abs=1e-12)
    if shift_mean:
        whitened = out[_t(M).bool()]
        assert whitened.mean().item() == pytest.approx(0.0, abs=1e-12)
        assert whitened.var(unbiased=unbiased).item() == pytest.approx(1.0, rel=1e-6)


def test_masked_whiten_biased_is_the_default_scaled():
    # the two variances differ by n / (n - 1): whitened values by sqrt((n - 1) / n) (eps aside)
    n = len(_selected(X, M))
    unb = algos.masked_whiten(_t(X), _t(M), eps=0.0)
    bia = algos.masked_whiten(_t(X), _t(M), eps=0.0, unbiased=False)
    assert torch.allclose(bia * math.sqrt((n - 1) / n), unb, rtol=1e-12, atol=0)
    single = algos.masked_whiten(_t([[5.0, 1.0, 2.0]]), _t([[0, 1, 0]]), unbiased=False)
    assert torch.isfinite(single).all() and torch.equal(single, torch.zeros_like(single))


def test_masked_whiten_single_element_and_constant_are_finite():
    x = _t([[5.0, 1.0, 2.0]])
    out = algos.masked_whiten(x, _t([[0, 1, 0]]))
    assert torch.equal(out, torch.zeros_like(out))
    const = algos.masked_whiten(torch.full((2, 3), 4.0), torch.ones(2, 3))
    assert torch.equal(const, torch.zeros_like(const))
    empty = algos.masked_whiten(x, torch.zeros(1, 3))
    assert torch.equal(empty, torch.zeros_like(empty))


def test_non_finite_padding_does_not_leak():
    x = _t([[1.0, float("nan"), 3.0], [float("inf"), 2.0, float("-inf")]])
    m = _t([[1, 0, 1], [0, 1, 0]])
    assert algos.masked_sum(x, m).item() == pytest.approx(6.0)
    assert algos.masked_mean(x, m).item() == pytest.approx(2.0)
    assert algos.masked_var(x, m).item() == pytest.approx(1.0)
    assert torch.isfinite(algos.masked_whiten(x, m)).all()


def test_shape_mismatch_is_value_error():
    with pytest.raises(ValueError, match="shape"):
        algos.masked_mean(torch.zeros(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="shape"):
        algos.masked_whiten(torch.zeros(2, 3), torch.ones(3, 2))
