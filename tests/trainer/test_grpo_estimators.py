"""The GRPO trainer's advantages phase with the 0.2.0 estimator options: the token-level `reinforce_pp` reaches the
loss as [B, T] advantages, `reinforce_pp_seq` keeps the per-sample form, and `algo.adv_eps` is GRPO's epsilon
(default 1e-6: the numbers of earlier releases, bit for bit)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from align import algos
from align.config import GRPOConfig
from align.errors import ConfigError
from align.trainer.forward import ForwardOutput
from align.trainer.grpo import GRPOAlgorithm
from align.trainer.state import StepData

G = 4
SCORES = [1.0, 0.0, 0.0, 1.0, 0.2, 0.2 + 1e-5, 0.2, 0.2, 3.0, -1.0, 0.5, 0.0]
MASK = [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0],
        [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1],
        [1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]]


def algorithm(**algo) -> GRPOAlgorithm:
    cfg = GRPOConfig(model={"path": "m"}, data={"path": "d.jsonl"}, reward={"functions": ["math_verify"]},
                     algo={"group_size": G, **algo})
    return GRPOAlgorithm(cfg.algo)


def step_data(valid=None) -> StepData:
    step = StepData(batch=SimpleNamespace(mask=torch.tensor(MASK, dtype=torch.float32)))
    step.scores = torch.tensor(SCORES, dtype=torch.float32)
    step.valid = torch.ones(len(SCORES), dtype=torch.bool) if valid is None else valid
    return step


def token_reference(scores, mask, valid, eps=1e-8):
    """REINFORCE++-baseline per token with gamma 1 (Hu 2025): each response token of a row carries the row's
    group-centred score; whiten over all response tokens of the valid rows (unbiased variance)."""
    B, T = len(mask), len(mask[0])
    centred = [0.0] * B
    for start in range(0, B, G):
        members = [i for i in range(start, start + G) if valid[i]]
        mean = sum(scores[i] for i in members) / len(members)
        for i in members:
            centred[i] = scores[i] - mean
    pool = [centred[i] for i in range(B) for t in range(T) if valid[i] and mask[i][t]]
    mu = sum(pool) / len(pool)
    var = sum((x - mu) ** 2 for x in pool) / (len(pool) - 1)
    return [[(centred[i] - mu) / math.sqrt(var + eps) if valid[i] and mask[i][t] else 0.0 for t in range(T)]
            for i in range(B)]


def test_reinforce_pp_gives_token_level_advantages_to_the_loss():
    algo, step = algorithm(advantage="reinforce_pp"), step_data()
    metrics = algo.compute_advantages(step)
    want = torch.tensor(token_reference([float(torch.tensor(s)) for s in SCORES], MASK, [True] * 12), dtype=torch.float64)
    assert step.advantages.shape == (12, 4)
    torch.testing.assert_close(step.advantages.double(), want, rtol=1e-6, atol=1e-6)
    mask = step.mask.bool()
    assert metrics["advantages/abs_mean"] == pytest.approx(float(want.abs()[mask].mean()), rel=1e-5)
    # the loss takes the [B, T] advantages as they are (PPO-clip per token)
    g = torch.Generator().manual_seed(0)
    old = torch.randn(12, 4, generator=g) * 0.2 - 1.0
    logp = (old + torch.randn(12, 4, generator=g) * 0.1).requires_grad_()
    rows = step.train_rows
    loss, _ = algo.loss(ForwardOutput(logprobs=logp), step, rows, old, float(step.mask.sum()), 0.0)
    want_loss, _ = algos.policy_loss(logp, old, want.float(), step.mask, 0.2, 0.2, None, "token-mean",
                                     global_denom=float(step.mask.sum()))
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert logp.grad[~mask].abs().max() == 0


def test_reinforce_pp_token_level_skips_invalid_samples():
    valid = torch.ones(12, dtype=torch.bool)
    valid[5] = False
    algo, step = algorithm(advantage="reinforce_pp"), step_data(valid)
    algo.compute_advantages(step)
    want = token_reference([float(torch.tensor(s)) for s in SCORES], MASK, valid.tolist())
    torch.testing.assert_close(step.advantages.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert (step.advantages[5] == 0).all() and 5 not in step.train_rows.tolist()


def test_reinforce_pp_seq_keeps_the_per_sample_form():
    algo, step = algorithm(advantage="reinforce_pp_seq"), step_data()
    algo.compute_advantages(step)
    assert step.advantages.shape == (12,)
    assert torch.equal(step.advantages, algos.reinforce_pp_advantages(step.scores, G).float())


def test_adv_eps_default_is_the_old_epsilon_bit_for_bit():
    algo, step = algorithm(), step_data()
    assert algo.cfg.adv_eps == 1e-6
    algo.compute_advantages(step)
    assert torch.equal(step.advantages, algos.group_advantages(step.scores, G, scale="group").float())


@pytest.mark.parametrize("eps", [1e-4, 0.0])
def test_adv_eps_reaches_the_grpo_advantages(eps):
    algo, step = algorithm(adv_eps=eps), step_data()
    algo.compute_advantages(step)
    scores = [float(torch.tensor(s)) for s in SCORES]  # float32 scores, as the trainer holds them
    want = []
    for start in range(0, 12, G):
        group = scores[start:start + G]
        mean = sum(group) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (G - 1))
        want += [(x - mean) / (std + eps) for x in group]
    assert step.advantages.tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)
    # the nearly-equal group (std ~ 5e-6) is where the epsilon shows
    default = algos.group_advantages(step.scores, G).float()
    if eps > 1e-6:
        assert float(step.advantages[4:8].abs().max()) < 0.5 * float(default[4:8].abs().max())


@pytest.mark.parametrize("algo, needles", [
    ({"adv_eps": -1e-3}, ["algo.adv_eps", ">= 0"]),
    ({"adv_eps": "nan"}, ["algo.adv_eps", "finite"]),
    ({"advantage": "rloo", "adv_eps": 1e-4}, ["algo.adv_eps", "'grpo' only"]),
])
def test_adv_eps_is_validated(algo, needles):
    with pytest.raises(ConfigError) as err:
        algorithm(**algo)
    msg = str(err.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
