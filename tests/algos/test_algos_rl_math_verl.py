"""verl-compatible RL math against float64 references written from the formulas with python loops:
low_var_kl (verl's clamped k3), REINFORCE++ in its token-level form (the registered `reinforce_pp`), the
per-sample form kept as `reinforce_pp_seq`, and GRPO's configurable epsilon."""
from __future__ import annotations

import math

import pytest
import torch

from align import algos
from align.registry import ADVANTAGES

NAN = float("nan")


# ------------------------------------------------------------------------------------------------ low_var_kl
def verl_low_var_kl(logp: float, ref: float) -> float:
    """verl core_algos.kl_penalty('low_var_kl'), step by step: kl = ref - logp; ratio = exp(kl);
    kld = ratio - kl - 1; clamp(kld, -10, 10)."""
    kl = ref - logp
    ratio = math.exp(kl) if kl < 700 else math.inf
    kld = ratio - kl - 1
    return min(max(kld, -10.0), 10.0)


def schulman_k3(logp: float, ref: float) -> float:
    d = ref - logp
    return math.exp(d) - d - 1


def test_low_var_kl_is_verls_clamped_k3():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(6, 40, generator=g, dtype=torch.float64) * 4 - 2
    ref = torch.randn(6, 40, generator=g, dtype=torch.float64) * 4 - 2
    # extremes: far beyond the +-20 log-ratio guard, at the clamp boundary, equal log-probs
    logp[0, :6] = torch.tensor([-50.0, -1.0, -0.5, -3.0, -1.0, -7.0], dtype=torch.float64)
    ref[0, :6] = torch.tensor([-1.0, -60.0, -0.5, -3.0 + 2.0, -1.0 - 10.0, -7.0], dtype=torch.float64)
    got = algos.kl_penalty(logp, ref, "low_var_kl")
    k3 = algos.kl_penalty(logp, ref, "k3")
    n_clamped = 0
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            lp, rf = float(logp[i, t]), float(ref[i, t])
            want = verl_low_var_kl(lp, rf)
            assert float(got[i, t]) == pytest.approx(want, rel=1e-13, abs=1e-13)
            unclamped = schulman_k3(lp, rf) if rf - lp < 700 else math.inf
            if unclamped <= 10.0:  # where verl's clamp is inactive, low_var_kl is Schulman's k3
                assert float(k3[i, t]) == pytest.approx(unclamped, rel=1e-13, abs=1e-13)
                assert float(got[i, t]) == pytest.approx(float(k3[i, t]), rel=1e-13, abs=1e-13)
            else:
                n_clamped += 1
                assert float(got[i, t]) == 10.0 and float(k3[i, t]) > 10.0  # our k3 stays unclamped
    assert n_clamped >= 3


def test_low_var_kl_gradient_is_zero_where_clamped_and_k3s_elsewhere():
    logp = torch.tensor([-0.3, -2.0, -40.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.0, -1.5, -1.0], dtype=torch.float64)
    algos.kl_penalty(logp, ref, "low_var_kl").sum().backward()
    # d/dlogp [exp(ref - logp) - (ref - logp) - 1] = 1 - exp(ref - logp); 0 where the clamp at 10 is active
    want = [1 - math.exp(-1.0 + 0.3), 1 - math.exp(-1.5 + 2.0), 0.0]
    assert logp.grad.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)


# ------------------------------------------------------------------------------------------------ REINFORCE++
def reinforce_pp_tokens_reference(scores, mask, G, valid, gamma=1.0, token_rewards=None, eps=1e-8):
    """REINFORCE++-baseline, token level (Hu 2025, arXiv 2501.03262; OpenRLHF reinforce_baseline):
    1. s_i - mean of the valid scores of i's group (groups with < 2 valid samples, invalid samples: dropped);
    2. r_t = token_rewards_t + (that centred score on the last response token); G_t = r_t + gamma G_{t+1}
       over the row's response tokens;
    3. A = (G - mean) / sqrt(var + eps), mean / unbiased var over every response token of every kept row."""
    B, T = len(mask), len(mask[0])
    kept, centred = [False] * B, [0.0] * B
    for start in range(0, B, G):
        members = [i for i in range(start, start + G) if valid[i]]
        if len(members) < 2:
            continue
        mean = sum(scores[i] for i in members) / len(members)
        for i in members:
            kept[i], centred[i] = True, scores[i] - mean
    returns = [[0.0] * T for _ in range(B)]
    for i in range(B):
        positions = [t for t in range(T) if mask[i][t]]
        if not kept[i] or not positions:
            continue
        running = 0.0
        for t in reversed(positions):
            r = (token_rewards[i][t] if token_rewards is not None else 0.0) + (centred[i] if t == positions[-1] else 0.0)
            running = r + gamma * running
            returns[i][t] = running
    pool = [returns[i][t] for i in range(B) for t in range(T) if kept[i] and mask[i][t]]
    mean = sum(pool) / len(pool)
    var = sum((x - mean) ** 2 for x in pool) / (len(pool) - 1)
    return [[(returns[i][t] - mean) / math.sqrt(var + eps) if kept[i] and mask[i][t] else 0.0 for t in range(T)]
            for i in range(B)]


SCORES = [1.0, 0.0, 0.5, 2.0, NAN, 0.0, 1.0, 1.5, 0.3, 0.3, 0.3, 0.3]
MASK = [
    [1, 1, 0, 1, 0, 0],
    [1, 1, 1, 1, 1, 1],
    [1, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0],  # a valid sample with no response token
    [1, 1, 1, 0, 0, 0],  # an invalid sample (NaN score)
    [1, 1, 1, 0, 0, 0],
    [1, 1, 1, 1, 0, 0],
    [1, 0, 1, 0, 1, 1],
    [1, 1, 0, 0, 0, 0],  # a zero-variance group: centred 0, its tokens still enter the whitening
    [1, 1, 1, 1, 1, 0],
    [1, 0, 0, 0, 0, 0],
    [1, 1, 1, 0, 0, 0],
]
VALID = [s == s for s in SCORES]


@pytest.mark.parametrize("gamma,with_token_rewards", [(1.0, False), (0.9, False), (0.95, True)])
def test_registered_reinforce_pp_is_token_level_and_matches_the_formula(gamma, with_token_rewards):
    fn = ADVANTAGES.get("reinforce_pp")
    assert fn is algos.ADVANTAGE_ESTIMATORS["reinforce_pp"] is algos.reinforce_pp_token_estimator
    assert algos.is_token_level(fn)
    g = torch.Generator().manual_seed(7)
    token_rewards = torch.randn(len(MASK), len(MASK[0]), generator=g, dtype=torch.float64) * 0.2
    kwargs = {"gamma": gamma} | ({"token_rewards": token_rewards} if with_token_rewards else {})
    got = fn(torch.tensor(SCORES, dtype=torch.float64), 4, mask=torch.tensor(MASK), valid=torch.tensor(VALID),
             **kwargs)
    want = reinforce_pp_tokens_reference([s if v else 0.0 for s, v in zip(SCORES, VALID)], MASK, 4, VALID, gamma,
                                         token_rewards.tolist() if with_token_rewards else None)
    assert got.shape == (len(MASK), len(MASK[0])) and got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    pad = ~torch.tensor(MASK, dtype=torch.bool)
    assert (got[pad] == 0).all() and (got[4] == 0).all()  # padding and the invalid sample carry nothing


def test_token_level_reinforce_pp_weights_samples_by_length_unlike_reinforce_pp_seq():
    """With gamma 1 every token of a row carries the row's centred score; token whitening counts long rows more."""
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]])
    tok = algos.ADVANTAGE_ESTIMATORS["reinforce_pp"](scores, 4, mask=mask)
    seq = algos.ADVANTAGE_ESTIMATORS["reinforce_pp_seq"](scores, 4)
    assert torch.equal(seq, algos.reinforce_pp_advantages(scores, 4))  # the old meaning, under its new name
    want = reinforce_pp_tokens_reference(scores.tolist(), mask.tolist(), 4, [True] * 4)
    torch.testing.assert_close(tok, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(tok[:, 0], seq)  # 13 tokens weighted 1:12, not 4 samples weighted equally


def test_the_estimator_protocol_tells_token_level_from_outcome_level():
    assert {n for n in ADVANTAGES.names() if algos.is_token_level(ADVANTAGES.get(n))} >= {"reinforce_pp"}
    for name in ("grpo", "dr_grpo", "rloo", "reinforce_pp_seq"):
        assert not algos.is_token_level(ADVANTAGES.get(name))

    @algos.token_level
    def plug_in(scores, group_size, *, mask, valid=None):
        return torch.zeros(mask.shape)

    assert algos.is_token_level(plug_in) and plug_in(torch.zeros(2), 2, mask=torch.ones(2, 3)).shape == (2, 3)


# ------------------------------------------------------------------------------------------------ GRPO eps
def grpo_reference(scores, G, eps):
    """(s - group mean) / (unbiased group std + eps), loops (Shao et al. 2024, arXiv 2402.03300, sec. 4.1.2)."""
    out = []
    for start in range(0, len(scores), G):
        group = scores[start:start + G]
        mean = sum(group) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (G - 1))
        out += [(x - mean) / (std + eps) for x in group]
    return out


@pytest.mark.parametrize("eps", [1e-6, 1e-4, 0.1])
def test_group_advantages_eps_matches_the_formula(eps):
    scores = [1.0, 0.0, 0.0, 0.0, 0.1, 0.1 + 1e-5, 0.1, 0.1, 2.0, -1.0, 3.0, 0.25]
    got = algos.group_advantages(torch.tensor(scores, dtype=torch.float64), 4, scale="group", eps=eps)
    # rel 1e-9: the loop reference's own cancellation error (std ~ 5e-6 of values ~ 0.1) is ~1e-11 relative
    assert got.tolist() == pytest.approx(grpo_reference(scores, 4, eps), rel=1e-9, abs=1e-12)


def test_grpo_eps_matters_for_nearly_equal_scores():
    scores = torch.tensor([0.1, 0.1 + 1e-5, 0.1, 0.1], dtype=torch.float64)
    small = algos.group_advantages(scores, 4, eps=1e-6)
    trl = algos.group_advantages(scores, 4, eps=1e-4)
    assert float(small.abs().max()) > 5 * float(trl.abs().max())
