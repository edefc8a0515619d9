"""Group-relative advantage estimators vs Python/statistics references in float64."""
import inspect
import math
import statistics

import pytest
import torch

from align import algos

NAN = float("nan")


def ref_group(scores, G, scale, eps=1e-6, valid=None):
    valid = valid or [True] * len(scores)
    all_valid = [s for s, v in zip(scores, valid) if v]
    batch_std = statistics.stdev(all_valid) if len(all_valid) >= 2 else 0.0
    out = []
    for g in range(0, len(scores), G):
        vals = [s for s, v in zip(scores[g : g + G], valid[g : g + G]) if v]
        for s, v in zip(scores[g : g + G], valid[g : g + G]):
            if not v or len(vals) < 2:
                out.append(0.0)
                continue
            mu = statistics.fmean(vals)
            if scale == "group":
                out.append((s - mu) / (statistics.stdev(vals) + eps))
            elif scale == "batch":
                out.append((s - mu) / (batch_std + eps))
            else:
                out.append(s - mu)
    return out


def ref_rloo(scores, G, valid=None):
    valid = valid or [True] * len(scores)
    out = []
    for g in range(0, len(scores), G):
        idx = [i for i in range(g, g + G) if valid[i]]
        for i in range(g, g + G):
            if not valid[i] or len(idx) < 2:
                out.append(0.0)
            else:
                others = [scores[j] for j in idx if j != i]
                out.append(scores[i] - sum(others) / len(others))
    return out


def ref_centered(scores, G, valid):
    """Group-mean-centred scores and whether each sample is used (valid and its group has >= 2 valid)."""
    centered, used = [], []
    for g in range(0, len(scores), G):
        idx = [i for i in range(g, g + G) if valid[i]]
        mu = statistics.fmean(scores[i] for i in idx) if idx else 0.0
        for i in range(g, g + G):
            ok = valid[i] and len(idx) >= 2
            used.append(ok)
            centered.append(scores[i] - mu if ok else 0.0)
    return centered, used


def ref_reinforce_pp(scores, G, valid=None, eps=1e-8):
    valid = valid or [True] * len(scores)
    centered, used = ref_centered(scores, G, valid)
    pool = [c for c, u in zip(centered, used) if u]
    if not pool:
        return [0.0] * len(scores)
    mu = statistics.fmean(pool)
    var = statistics.variance(pool) if len(pool) >= 2 else 0.0
    return [(c - mu) / math.sqrt(var + eps) if u else 0.0 for c, u in zip(centered, used)]


SCORES = [1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 2.0, -1.0, 3.0, 0.25]


def test_hand_computed_group():
    adv = algos.group_advantages(torch.tensor(SCORES[:8], dtype=torch.float64), 4)
    # group 0: mean 0.25, unbiased std 0.5 -> (0.75, -0.25) / 0.5; group 1: equal scores -> 0
    assert adv.tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0], rel=1e-5)
    assert (adv[4:] == 0).all()


def test_hand_computed_rloo():
    adv = algos.rloo_advantages(torch.tensor(SCORES[:4], dtype=torch.float64), 4)
    assert adv.tolist() == pytest.approx([1.0, -1 / 3, -1 / 3, -1 / 3])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("G", [2, 3, 4, 6])
def test_group_advantages_match_reference(scale, G):
    got = algos.group_advantages(torch.tensor(SCORES, dtype=torch.float64), G, scale=scale)
    assert got.tolist() == pytest.approx(ref_group(SCORES, G, scale), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_with_invalid_samples(scale):
    scores = [1.0, NAN, 0.0, 0.0, 2.0, float("inf"), NAN, NAN, 0.3, 0.7, 0.1, 0.9]
    valid = [True, False, True, True, True, False, False, False, True, True, True, True]
    got = algos.group_advantages(torch.tensor(scores), 4, scale=scale, valid=torch.tensor(valid))
    assert torch.isfinite(got).all()
    want = ref_group([0.0 if not v else s for s, v in zip(scores, valid)], 4, scale, valid=valid)
    assert got.tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)
    # excluded sample -> 0; group with a single valid sample -> all zeros
    assert got[1] == 0 and (got[4:8] == 0).all()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equal_scores_give_exact_zero_even_with_eps_zero(scale, dtype):
    # 0.1 is not representable: a naive mean is one ulp off and (s - mean) / std would be O(1) with eps=0.
    s = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7], dtype=dtype)
    assert torch.equal(algos.group_advantages(s, 3, scale=scale, eps=0.0), torch.zeros(6, dtype=dtype))
    assert torch.equal(algos.rloo_advantages(s, 3), torch.zeros(6, dtype=dtype))
    assert torch.equal(algos.reinforce_pp_advantages(s, 3), torch.zeros(6, dtype=dtype))


def test_group_size_one_gives_zeros():
    assert torch.equal(algos.group_advantages(torch.tensor([1.0, 2.0]), 1), torch.zeros(2))


def test_dtypes_follow_input():
    assert algos.group_advantages(torch.tensor([1, 0, 1, 1]), 2).dtype == torch.float32
    assert algos.group_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), 2).dtype == torch.float64
    assert algos.rloo_advantages(torch.tensor([1.0, 0.0], dtype=torch.bfloat16), 2).dtype == torch.bfloat16


@pytest.mark.parametrize("G", [2, 3, 4])
def test_rloo_matches_reference(G):
    got = algos.rloo_advantages(torch.tensor(SCORES, dtype=torch.float64), G)
    assert got.tolist() == pytest.approx(ref_rloo(SCORES, G), rel=1e-12, abs=1e-12)


def test_rloo_with_invalid_samples():
    scores = [1.0, NAN, 0.0, 0.5, 2.0, NAN, NAN, NAN]
    valid = [True, False, True, True, True, False, False, False]
    got = algos.rloo_advantages(torch.tensor(scores), 4, valid=torch.tensor(valid))
    want = ref_rloo([0.0 if not v else s for s, v in zip(scores, valid)], 4, valid)
    assert got.tolist() == pytest.approx(want, abs=1e-6)
    assert got.tolist()[:4] == pytest.approx([0.75, 0.0, -0.75, 0.0])


@pytest.mark.parametrize("G", [2, 4])
def test_reinforce_pp_matches_reference(G):
    got = algos.reinforce_pp_advantages(torch.tensor(SCORES, dtype=torch.float64), G)
    assert got.tolist() == pytest.approx(ref_reinforce_pp(SCORES, G), rel=1e-9, abs=1e-12)


def test_reinforce_pp_with_invalid_samples():
    scores = [1.0, NAN, 0.0, 0.5, 2.0, NAN, NAN, NAN, 0.3, 0.1, 0.4, 0.2]
    valid = [s == s for s in scores]
    got = algos.reinforce_pp_advantages(torch.tensor(scores, dtype=torch.float64), 4, valid=torch.tensor(valid))
    want = ref_reinforce_pp([s if v else 0.0 for s, v in zip(scores, valid)], 4, valid)
    assert got.tolist() == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert (got[4:8] == 0).all()


def ref_reinforce_pp_tokens(scores, mask, G, token_rewards, gamma, valid, eps=1e-8):
    centered, used = ref_centered(scores, G, valid)
    B, T = len(mask), len(mask[0])
    returns = [[0.0] * T for _ in range(B)]
    for i in range(B):
        pos = [t for t in range(T) if mask[i][t]] if used[i] else []
        if not pos:
            continue
        running = 0.0
        for t in reversed(pos):
            r = token_rewards[i][t] + (centered[i] if t == pos[-1] else 0.0)
            running = r + gamma * running
            returns[i][t] = running
    pool = [returns[i][t] for i in range(B) for t in range(T) if used[i] and mask[i][t]]
    mu = statistics.fmean(pool)
    var = statistics.variance(pool)
    adv = [[(returns[i][t] - mu) / math.sqrt(var + eps) if used[i] and mask[i][t] else 0.0 for t in range(T)] for i in range(B)]
    return adv, returns


@pytest.mark.parametrize("gamma,with_token_rewards", [(1.0, False), (1.0, True), (0.9, True)])
def test_reinforce_pp_token_advantages_match_reference(gamma, with_token_rewards):
    g = torch.Generator().manual_seed(1)
    scores = [1.0, 0.0, 0.5, 2.0, NAN, 0.0, 1.0, 1.5]
    valid = [s == s for s in scores]
    mask = [
        [1, 1, 0, 1, 0],
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],  # valid sample with no response token
        [1, 1, 1, 0, 0],  # invalid sample
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 0, 1, 0, 1],
    ]
    token_rewards = torch.randn(8, 5, generator=g, dtype=torch.float64) * 0.1
    tr_list = token_rewards.tolist() if with_token_rewards else [[0.0] * 5 for _ in range(8)]
    adv, ret = algos.reinforce_pp_token_advantages(
        torch.tensor(scores, dtype=torch.float64),
        torch.tensor(mask),
        4,
        token_rewards=token_rewards if with_token_rewards else None,
        gamma=gamma,
        valid=torch.tensor(valid),
    )
    want_adv, want_ret = ref_reinforce_pp_tokens(
        [s if v else 0.0 for s, v in zip(scores, valid)], mask, 4, tr_list, gamma, valid
    )
    assert adv.shape == (8, 5) and torch.isfinite(adv).all()
    torch.testing.assert_close(ret, torch.tensor(want_ret, dtype=torch.float64), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(adv, torch.tensor(want_adv, dtype=torch.float64), atol=1e-9, rtol=1e-9)


def test_registry_dict_common_signature():
    # 0.2.0: `reinforce_pp` is the token-level form (tests/algos/test_algos_rl_math_verl.py); the per-sample
    # form checked here is `reinforce_pp_seq`
    assert set(algos.ADVANTAGE_ESTIMATORS) == {"grpo", "rloo", "reinforce_pp", "reinforce_pp_seq", "dr_grpo"}
    scores = torch.tensor(SCORES, dtype=torch.float64)
    valid = torch.ones(len(SCORES), dtype=torch.bool)
    valid[1] = False
    refs = {
        "grpo": lambda s, v: ref_group(s, 4, "group", valid=v),
        "dr_grpo": lambda s, v: ref_group(s, 4, "none", valid=v),
        "rloo": lambda s, v: ref_rloo(s, 4, valid=v),
        "reinforce_pp_seq": lambda s, v: ref_reinforce_pp(s, 4, valid=v),
    }
    for name, fn in algos.ADVANTAGE_ESTIMATORS.items():
        if algos.is_token_level(fn):
            params = inspect.signature(fn).parameters
            assert params["mask"].kind is inspect.Parameter.KEYWORD_ONLY, name
            continue
        params = inspect.signature(fn).parameters
        assert list(params)[:2] == ["scores", "group_size"] and params["valid"].kind is inspect.Parameter.KEYWORD_ONLY
        got = fn(scores, 4, valid=valid)
        assert got.shape == (12,)
        assert got.tolist() == pytest.approx(refs[name](SCORES, valid.tolist()), rel=1e-9, abs=1e-12), name
        assert fn(scores, 4).tolist() == pytest.approx(refs[name](SCORES, None), rel=1e-9, abs=1e-12), name


@pytest.mark.parametrize("fn", [algos.group_advantages, algos.rloo_advantages, algos.reinforce_pp_advantages])
def test_validation(fn):
    with pytest.raises(ValueError, match="divide"):
        fn(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="1-D"):
        fn(torch.zeros(2, 4), 4)
    with pytest.raises(ValueError, match="NaN"):
        fn(torch.tensor([1.0, NAN, 0.0, 0.0]), 2)
    with pytest.raises(ValueError, match="shape"):
        fn(torch.zeros(4), 2, valid=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="group_size"):
        fn(torch.zeros(4), 0)


def test_rloo_needs_two_and_scale_is_checked():
    with pytest.raises(ValueError, match="group_size >= 2"):
        algos.rloo_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="scale"):
        algos.group_advantages(torch.zeros(4), 2, scale="std")
