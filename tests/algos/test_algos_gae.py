"""GAE vs the textbook backward loop (float64, per row, padding skipped) and hand-computed values."""
import pytest
import torch

from align import algos


def ref_gae(rewards, values, mask, gamma, lam):
    """Textbook GAE per row: walk the response positions backwards; value after the last one is 0."""
    adv = [[0.0] * len(r) for r in rewards]
    ret = [[0.0] * len(r) for r in rewards]
    for i, (r_row, v_row, m_row) in enumerate(zip(rewards, values, mask)):
        positions = [t for t, m in enumerate(m_row) if m]
        next_value, next_adv = 0.0, 0.0
        for t in reversed(positions):
            delta = r_row[t] + gamma * next_value - v_row[t]
            a = delta + gamma * lam * next_adv
            adv[i][t] = a
            ret[i][t] = a + v_row[t]
            next_value, next_adv = v_row[t], a
    return adv, ret


def test_hand_computed_with_padding_in_the_middle():
    # Row with mask [1,1,0,1,0]; garbage values at padding must be ignored.
    rewards = torch.tensor([[0.0, 0.0, 5.0, 1.0, 7.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.4, 9.0, 0.2, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1, 0]])
    adv, ret = algos.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=3: 1 - 0.2 = 0.8; t=1: (0.9*0.2 - 0.4) + 0.72*0.8 = 0.356; t=0: (0.9*0.4 - 0.5) + 0.72*0.356 = 0.11632
    assert adv[0].tolist() == pytest.approx([0.11632, 0.356, 0.0, 0.8, 0.0], abs=1e-12)
    assert ret[0].tolist() == pytest.approx([0.61632, 0.756, 0.0, 1.0, 0.0], abs=1e-12)


def test_gamma_lam_one_gives_reward_to_go_minus_value():
    rewards = torch.tensor([[0.0, 0.5, 0.0, 2.0]], dtype=torch.float64)
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    adv, ret = algos.gae(rewards, values, torch.ones(1, 4), gamma=1.0, lam=1.0)
    assert ret[0].tolist() == pytest.approx([2.5, 2.5, 2.0, 2.0])
    assert adv[0].tolist() == pytest.approx([1.5, 0.5, -1.0, -2.0])


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (0.5, 1.0), (0.0, 0.7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_masks_match_reference(gamma, lam, dtype):
    g = torch.Generator().manual_seed(0)
    B, T = 6, 9
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.35).long()
    mask[0] = torch.tensor([1, 1, 0, 1, 0, 0, 0, 0, 0])  # padding in the middle
    mask[1] = 0  # a row with no response token
    mask[2] = 1  # full row
    mask[3] = torch.tensor([0, 0, 1, 1, 1, 0, 1, 0, 0])  # left padding + hole
    ref_adv, ref_ret = ref_gae(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    adv, ret = algos.gae(rewards.to(dtype), values.to(dtype), mask, gamma, lam)
    assert adv.dtype == dtype and ret.dtype == dtype and adv.shape == (B, T)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(adv.double(), torch.tensor(ref_adv, dtype=torch.float64), atol=tol, rtol=tol)
    torch.testing.assert_close(ret.double(), torch.tensor(ref_ret, dtype=torch.float64), atol=tol, rtol=tol)
    # returns = advantages + values on response tokens, 0 on padding
    keep = mask.bool()
    torch.testing.assert_close(ret[keep], (adv + values.to(dtype))[keep])
    assert (adv[~keep] == 0).all() and (ret[~keep] == 0).all()


def test_nan_at_padding_does_not_leak_and_no_grad():
    rewards = torch.tensor([[1.0, float("nan"), 0.0]], requires_grad=True)
    values = torch.tensor([[0.3, float("inf"), 0.1]], requires_grad=True)
    adv, ret = algos.gae(rewards, values, torch.tensor([[1, 0, 1]]), gamma=1.0, lam=1.0)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert adv[0].tolist() == pytest.approx([0.7, 0.0, -0.1])
    assert not adv.requires_grad and not ret.requires_grad


def test_validation():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="shape"):
        algos.gae(z, torch.zeros(2, 4), torch.ones(2, 3), 1.0, 0.95)
    with pytest.raises(ValueError, match="shape"):
        algos.gae(z, z, torch.ones(3, 3), 1.0, 0.95)
    with pytest.raises(ValueError, match="gamma"):
        algos.gae(z, z, torch.ones(2, 3), 1.5, 0.95)
    with pytest.raises(ValueError, match="dims"):
        algos.gae(torch.zeros(3), torch.zeros(3), torch.ones(3), 1.0, 0.95)
