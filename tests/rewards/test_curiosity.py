"""ICM shapes, loss, intrinsic reward, gate, whitening and checkpointing against independent float64 references."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from align.rewards.curiosity import (
    ICM,
    CuriosityModule,
    forward_prediction_error,
    icm_loss,
    topk_hit_from_logits,
    whiten_intrinsic,
)

B, T, H, A, I = 3, 5, 8, 6, 12  # noqa: E741  (the paper's dims: batch, time, hidden, action, ICM feature)


def _linear_layers(seq: torch.nn.Sequential) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(m.weight.detach().double().numpy(), m.bias.detach().double().numpy())
            for m in seq if isinstance(m, torch.nn.Linear)]


def _mlp64(layers, x: np.ndarray) -> np.ndarray:
    for i, (w, b) in enumerate(layers):
        x = x @ w.T + b
        if i < len(layers) - 1:
            x = np.maximum(x, 0.0)
    return x


def _reference(icm: ICM, states: torch.Tensor, actions: torch.Tensor):
    """float64 numpy forward: (phi(s_{t+1}), f(phi(s_t), a_t)) and 0.5 * L2 error per token."""
    s = states.double().numpy()
    a = actions.double().numpy()
    phi = _mlp64(_linear_layers(icm.encoder), s)
    pred = _mlp64(_linear_layers(icm.forward_model), np.concatenate([phi[:, :-1], a], axis=-1))
    target = phi[:, 1:]
    err = 0.5 * np.sqrt(((pred - target) ** 2).sum(-1))
    err_sq = 0.5 * ((pred - target) ** 2).sum(-1)
    return target, pred, err, err_sq


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(B, T + 1, H, generator=g)
    actions = torch.randn(B, T, A, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.long)
    return states, actions, mask


def test_icm_layer_sizes_follow_the_paper():
    icm = ICM(H, A, I)
    enc = [(m.in_features, m.out_features) for m in icm.encoder if isinstance(m, torch.nn.Linear)]
    fwd = [(m.in_features, m.out_features) for m in icm.forward_model if isinstance(m, torch.nn.Linear)]
    assert enc == [(H, 2 * H), (2 * H, 2 * H), (2 * H, H)]
    assert fwd == [(H + A, I), (I, I), (I, H)]
    assert sum(isinstance(m, torch.nn.ReLU) for m in icm.encoder) == 2
    assert sum(isinstance(m, torch.nn.ReLU) for m in icm.forward_model) == 2
    # action_size defaults to h (the released code's 2h input)
    assert ICM(H, None, I).forward_model[0].in_features == 2 * H


def test_icm_forward_shapes_and_values_match_float64():
    states, actions, _ = _batch()
    icm = ICM(H, A, I)
    target, pred = icm(states, actions)
    assert target.shape == (B, T, H) and pred.shape == (B, T, H)
    ref_target, ref_pred, ref_err, ref_err_sq = _reference(icm, states, actions)
    np.testing.assert_allclose(target.detach().numpy(), ref_target, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred.detach().numpy(), ref_pred, rtol=1e-5, atol=1e-6)
    err = forward_prediction_error(target, pred)
    np.testing.assert_allclose(err.detach().numpy(), ref_err, rtol=1e-5, atol=1e-6)
    err_sq = forward_prediction_error(target, pred, squared=True)
    np.testing.assert_allclose(err_sq.detach().numpy(), ref_err_sq, rtol=1e-5, atol=1e-6)


def test_icm_rejects_misaligned_inputs():
    states, actions, _ = _batch()
    icm = ICM(H, A, I)
    with pytest.raises(ValueError, match=r"\[B, T\+1, h\]"):
        icm(states[:, :-1], actions)  # states must have one more position than actions
    with pytest.raises(ValueError, match="action_size"):
        icm(states, actions[..., :-1])


def test_icm_loss_matches_float64_masked_mean_of_half_l2_norms():
    states, actions, mask = _batch()
    icm = ICM(H, A, I)
    _, _, ref_err, ref_err_sq = _reference(icm, states, actions)
    m = mask.numpy().astype(np.float64)
    expected = (ref_err * m).sum() / m.sum()  # 0.5 * sum_t ||.||_2 m_t / sum_t m_t (released code)
    expected_sq = (ref_err_sq * m).sum() / m.sum()  # the paper's squared form
    target, pred = (x.detach() for x in icm(states, actions))
    assert float(icm_loss(target, pred, mask)) == pytest.approx(expected, rel=1e-5)
    assert float(icm_loss(target, pred, mask, squared=True)) == pytest.approx(expected_sq, rel=1e-5)
    # padding positions never count, even when they hold garbage
    poisoned = pred.clone()
    poisoned[1, 4] = float("nan")
    assert torch.isfinite(icm_loss(target, poisoned, mask))


def test_whitening_over_masked_tokens_against_numpy():
    g = torch.Generator().manual_seed(3)
    raw = torch.rand(4, 7, generator=g, dtype=torch.float64) * 3
    mask = (torch.rand(4, 7, generator=g) > 0.3).long()
    mask[0, 0] = 1
    out = whiten_intrinsic(raw, mask)
    vals = raw.numpy()[mask.numpy() == 1]
    expected = (raw.numpy() - vals.mean()) / np.sqrt(vals.var() + 1e-8)  # biased variance (np.var default)
    np.testing.assert_allclose(out.numpy()[mask.numpy() == 1], expected[mask.numpy() == 1], rtol=1e-12)
    assert (out.numpy()[mask.numpy() == 0] == 0).all()
    # released-code variant: padding enters the statistics as zeros
    out_all = whiten_intrinsic(raw, mask, include_padding=True)
    z = raw.numpy() * mask.numpy()
    expected_all = (z - z.mean()) / np.sqrt(z.var() + 1e-8)
    np.testing.assert_allclose(out_all.numpy()[mask.numpy() == 1], expected_all[mask.numpy() == 1], rtol=1e-12)


def test_topk_gate_against_brute_force_sorting():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 6, 11, generator=g)
    logits[0, 0, :4] = 2.5  # a tie at the top
    tokens = torch.randint(0, 11, (3, 6), generator=g)
    tokens[0, 0] = 2
    for k in (1, 2, 5):
        hit = topk_hit_from_logits(logits, tokens, k)
        for b in range(3):
            for t in range(6):
                row = logits[b, t].tolist()
                chosen = row[tokens[b, t]]
                # brute force: the token is a hit if fewer than k entries beat it strictly
                better = sum(1 for v in row if v > chosen)
                assert bool(hit[b, t]) == (better < k)
        # without ties the hit set equals membership in torch.topk's indices
        topk = torch.topk(logits[1:], k, dim=-1).indices
        member = (topk == tokens[1:].unsqueeze(-1)).any(-1)
        assert torch.equal(hit[1:], member)
    assert bool(topk_hit_from_logits(logits, tokens, 1)[0, 0])  # tied with the maximum -> top-1


def test_compute_gates_whitens_and_detaches():
    states, actions, mask = _batch(1)
    module = CuriosityModule(H, A, I, top_k=1, seed=5)
    topk_hit = torch.tensor([[1, 0, 0, 1, 0], [0, 1, 0, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out = module.compute(states, actions, mask, topk_hit)
    _, _, ref_err, _ = _reference(module.icm, states, actions)
    m = mask.numpy() == 1
    vals = ref_err[m]
    white = (ref_err - vals.mean()) / np.sqrt(vals.var() + 1e-8)
    gate = m & ~topk_hit.numpy()
    expected = np.where(gate, white, 0.0)
    np.testing.assert_allclose(out.intrinsic.numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.raw_error.numpy(), np.where(m, ref_err, 0.0), rtol=1e-5, atol=1e-6)
    assert torch.equal(out.gate, torch.as_tensor(gate, dtype=out.gate.dtype))
    assert not out.intrinsic.requires_grad
    assert out.metrics["curiosity/gate_rate"] == pytest.approx(gate.sum() / m.sum())
    assert out.metrics["curiosity/intrinsic_mean"] == pytest.approx(expected[gate].mean(), rel=1e-4, abs=1e-5)


def test_update_steps_adamw_on_the_loss_and_reduces_it():
    states, actions, mask = _batch(2)
    module = CuriosityModule(H, A, I, lr=1e-3, seed=0, max_grad_norm=None, weight_decay=0.0)
    before = [p.detach().clone() for p in module.icm.parameters()]
    # independent reference of the first step: Adam's first update is -lr * g / (|g| + eps) elementwise
    ref = ICM(H, A, I)
    ref.load_state_dict(module.icm.state_dict())
    target, pred = ref(states, actions)
    icm_loss(target, pred, mask).backward()
    expected = [p0 - 1e-3 * p.grad / (p.grad.abs() + 1e-8) for p0, p in zip(before, ref.parameters())]
    first = module.update(states, actions, mask)
    for p, e in zip(module.icm.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
    losses = [first["curiosity/icm_loss"]] + [module.update(states, actions, mask)["curiosity/icm_loss"] for _ in range(20)]
    assert losses[-1] < losses[0]
    assert module.num_updates == 21


def test_update_refuses_non_finite_input():
    states, actions, mask = _batch()
    module = CuriosityModule(H, A, I)
    before = [p.detach().clone() for p in module.icm.parameters()]
    states[0, 2, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        module.update(states, actions, mask)
    assert all(torch.equal(p, q) for p, q in zip(module.icm.parameters(), before))


def test_construction_does_not_touch_the_global_rng_and_is_seeded():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    a = CuriosityModule(H, A, I, seed=9)
    assert torch.equal(torch.rand(4), expected)
    b = CuriosityModule(H, A, I, seed=9)
    c = CuriosityModule(H, A, I, seed=10)
    sa, sb, sc = a.icm.state_dict(), b.icm.state_dict(), c.icm.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_checkpoint_resume_is_exact(tmp_path):
    batches = [_batch(s) for s in range(4)]
    full = CuriosityModule(H, A, I, lr=1e-3, seed=1)
    for s, a, m in batches:
        full.update(s, a, m)

    first = CuriosityModule(H, A, I, lr=1e-3, seed=1)
    for s, a, m in batches[:2]:
        first.update(s, a, m)
    torch.save(first.state_dict(), tmp_path / "curiosity.pt")
    resumed = CuriosityModule(H, A, I, lr=1e-3, seed=99)  # different init: everything must come from the file
    resumed.load_state_dict(torch.load(tmp_path / "curiosity.pt", weights_only=True))
    for s, a, m in batches[2:]:
        resumed.update(s, a, m)
    assert resumed.num_updates == 4
    for p, q in zip(full.icm.parameters(), resumed.icm.parameters()):
        assert torch.equal(p, q)
    hit = torch.zeros(B, T, dtype=torch.bool)
    assert torch.equal(full.compute(*batches[0], hit).intrinsic, resumed.compute(*batches[0], hit).intrinsic)

    other = CuriosityModule(H + 2, A, I)
    with pytest.raises(ValueError, match="sizes"):
        other.load_state_dict(first.state_dict())
