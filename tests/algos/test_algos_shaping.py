"""PPO / CD-RLHF per-token rewards: eta = 0 is bitwise plain PPO; eta > 0 adds eta * intrinsic; the score lands on the last token."""
from __future__ import annotations

import pytest
import torch

from align.algos import shaped_token_rewards


def plain_ppo_rewards(kl_coef, logprobs, ref_logprobs, scores, mask, clip=2.5):
    """Plain PPO reward shaping written out row by row (DeepSpeed-Chat / TRL style), independent of the module."""
    out = torch.zeros_like(logprobs)
    for b in range(logprobs.shape[0]):
        idx = [t for t in range(logprobs.shape[1]) if mask[b, t] != 0]
        for t in idx:
            out[b, t] = -kl_coef * (logprobs[b, t] - ref_logprobs[b, t])
        if idx:
            out[b, idx[-1]] = out[b, idx[-1]] + min(max(float(scores[b]), -clip), clip)
    return out


def curiosity_token_rewards(kl_coef, logprobs, ref, scores, mask, intrinsic=None, eta=0.0, score_clip=2.5):
    """The CD-RLHF shaping: k1 KL in the reward (logp - ref), as the released code."""
    return shaped_token_rewards(scores, mask, kl=logprobs - ref, kl_coef=kl_coef, intrinsic=intrinsic, eta=eta,
                                score_clip=score_clip)


def _inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(4, 6, generator=g, dtype=dtype) * 3
    ref = -torch.rand(4, 6, generator=g, dtype=dtype) * 3
    ref[0, 1] = logprobs[0, 1]  # logp == ref -> a signed zero in the KL term
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    scores = torch.tensor([0.7, -4.0, 3.1, 1.0], dtype=dtype)
    intrinsic = torch.randn(4, 6, generator=g, dtype=dtype)
    return logprobs, ref, scores, mask, intrinsic


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eta_zero_is_bitwise_plain_ppo(dtype):
    logprobs, ref, scores, mask, intrinsic = _inputs(dtype)
    expected = plain_ppo_rewards(0.05, logprobs, ref, scores, mask)
    for kwargs in ({}, {"intrinsic": intrinsic, "eta": 0.0}, {"intrinsic": None, "eta": 0.08}):
        got = curiosity_token_rewards(0.05, logprobs, ref, scores, mask, **kwargs)
        assert got.dtype == dtype
        # bit for bit, signed zeros included
        assert torch.equal(got.view(torch.int32 if dtype == torch.float32 else torch.int64),
                           expected.view(torch.int32 if dtype == torch.float32 else torch.int64))


def test_eta_positive_adds_the_bonus_on_response_tokens_only():
    logprobs, ref, scores, mask, intrinsic = _inputs(torch.float64)
    got = curiosity_token_rewards(0.1, logprobs, ref, scores, mask, intrinsic=intrinsic, eta=0.04)
    expected = plain_ppo_rewards(0.1, logprobs, ref, scores, mask) + 0.04 * intrinsic * mask
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-15)
    assert (got[mask == 0] == 0).all()


def test_score_is_clipped_and_lands_on_the_last_response_token():
    logprobs = torch.zeros(3, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    got = curiosity_token_rewards(0.05, logprobs, logprobs, torch.tensor([9.0, -1.0, 5.0]), mask)
    assert got.tolist() == [[0, 0, 0, 2.5], [0, -1.0, 0, 0], [0, 0, 0, 0]]
    unclipped = curiosity_token_rewards(0.05, logprobs, logprobs, torch.tensor([9.0, -1.0, 5.0]), mask, score_clip=None)
    assert unclipped[0, 3] == 9.0


def test_bad_inputs_are_refused():
    logprobs, ref, scores, mask, intrinsic = _inputs()
    with pytest.raises(ValueError, match="NaN"):
        curiosity_token_rewards(0.05, logprobs, ref, torch.tensor([0.0, float("nan"), 0.0, 0.0]), mask)
    with pytest.raises(ValueError, match=r"\[B\]"):
        curiosity_token_rewards(0.05, logprobs, ref, scores[:2], mask)
    with pytest.raises(ValueError, match="intrinsic"):
        curiosity_token_rewards(0.05, logprobs, ref, scores, mask, intrinsic=intrinsic[:, :3], eta=0.1)
