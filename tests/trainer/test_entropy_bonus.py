"""The entropy bonus of both losses against a float64 reference written out: with entropy_coef = c the loss is
the loss without it minus c * (the entropy aggregated as configured), and so is its gradient."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from align.config import GRPOAlgoConfig, PPOAlgoConfig
from align.trainer.forward import ForwardOutput
from align.trainer.grpo import GRPOAlgorithm
from align.trainer.ppo import PPOAlgorithm
from align.trainer.state import StepData

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
MASK = [[1, 1, 0, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 0, 0]]
B, T, V = 4, 5, 7


def denominator(mask: list[list[int]], agg: str) -> float:
    """What the trainer passes as the minibatch denominator (Trainer._denominator)."""
    if agg == "token-mean":
        return float(sum(map(sum, mask)))
    if agg == "seq-mean-token-mean":
        return float(sum(1 for row in mask if any(row)))
    return float(len(mask))


def entropy_reference(entropy: torch.Tensor, mask: list[list[int]], agg: str) -> torch.Tensor:
    """The aggregated entropy, token by token in float64 (keeps the autograd graph for the gradient check)."""
    rows = [[entropy[i, t] for t in range(T) if mask[i][t]] for i in range(B)]
    zero = entropy.new_zeros(())
    if agg == "token-mean":  # sum over tokens / token count
        return sum((x for r in rows for x in r), zero) / sum(len(r) for r in rows)
    if agg == "seq-mean-token-mean":  # mean over non-empty rows of the row mean
        means = [sum(r, zero) / len(r) for r in rows if r]
        return sum(means, zero) / len(means)
    if agg == "seq-mean-token-sum":  # mean over all B rows of the row sum
        return sum((sum(r, zero) for r in rows), zero) / B
    return sum((sum(r, zero) for r in rows), zero) / (B * T)  # sum-norm: / (B * L), L = T here


def inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, V, (B, T), generator=g)
    old = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3 - 1.5
    adv_seq = torch.randn(B, generator=g, dtype=torch.float64)
    adv_tok = torch.randn(B, T, generator=g, dtype=torch.float64)
    return logits, tokens, old, adv_seq, adv_tok


def forward(logits: torch.Tensor, tokens: torch.Tensor) -> ForwardOutput:
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, tokens[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return ForwardOutput(logprobs=logp, entropy=entropy)


def make(algo: str, agg: str, coef: float):
    if algo == "ppo":
        return PPOAlgorithm(PPOAlgoConfig(loss_agg=agg, entropy_coef=coef, kl_coef=0.0))
    return GRPOAlgorithm(GRPOAlgoConfig(loss_agg=agg, entropy_coef=coef, kl_coef=0.0))


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
@pytest.mark.parametrize("agg", AGGS)
def test_entropy_bonus_matches_the_reference(algo, agg):
    c = 0.37
    logits, tokens, old, adv_seq, adv_tok = inputs(seed=10 * AGGS.index(agg) + (algo == "ppo"))
    mask = torch.tensor(MASK, dtype=torch.float64)
    step = StepData(batch=SimpleNamespace(mask=mask))  # the losses read step.mask (the batch's) and advantages
    rows = torch.arange(B)
    step.advantages = adv_tok if algo == "ppo" else adv_seq
    denom = denominator(MASK, agg)

    def loss_and_grad(coef: float, extra=None):
        logits.grad = None
        fwd = forward(logits, tokens)
        loss, _ = make(algo, agg, coef).loss(fwd, step, rows, old, denom, vf_denom=float(mask.sum()))
        if extra is not None:
            loss = loss - extra * entropy_reference(fwd.entropy, MASK, agg)
        loss.backward()
        return loss.detach(), logits.grad.clone()

    with_bonus, grad_bonus = loss_and_grad(c)
    without, grad_without = loss_and_grad(0.0)
    expected, grad_expected = loss_and_grad(0.0, extra=c)  # loss without the bonus - c * reference entropy
    ent = entropy_reference(forward(logits, tokens).entropy, MASK, agg).detach()
    assert float(ent) > 0.1  # the bonus is not trivially zero
    assert with_bonus.dtype == torch.float64
    torch.testing.assert_close(with_bonus, without - c * ent, rtol=0, atol=1e-12)
    torch.testing.assert_close(with_bonus, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_bonus, grad_expected, rtol=0, atol=1e-12)
    assert not torch.allclose(grad_bonus, grad_without)  # the bonus moves the gradient
    # padding positions (and the empty row) get no gradient from the bonus
    pad = ~mask.bool()
    assert (grad_bonus - grad_without)[pad].abs().max() == 0


def test_algorithms_have_no_entropy_coef_property():
    """The loss reads cfg.entropy_coef; the old pass-through properties are gone."""
    for cls in (PPOAlgorithm, GRPOAlgorithm):
        assert "entropy_coef" not in vars(cls)
