"""Training on tool episodes, the math: observation tokens (RolloutBatch.tool_mask) are out of the policy loss, the
entropy, the KL, every denominator and PPO's advantages, on hand-built batches against float64 formulas written out
over the policy tokens only; and nothing read at an observation position changes the loss or its gradient."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from align.config import GRPOAlgoConfig, PPOAlgoConfig
from align.rollouts.batch import STOP_EOS, RolloutBatch
from align.trainer.forward import ForwardOutput
from align.trainer.grpo import GRPOAlgorithm
from align.trainer.learn_phases import LearnPhases
from align.trainer.ppo import PPOAlgorithm
from align.trainer.state import StepData

N, T = 4, 8
# per row: "p" policy token, "o" observation token, "." padding. Holes at the first (row 0) and the last
# (row 1) response position, a row without tools (row 2), an interior hole (row 3).
LAYOUT = ["oopppp..", "pppoopo" + "o", "pppppp..", "ppoppppp"]
NORM_L = 10


def layout_masks() -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.tensor([[c != "." for c in row] for row in LAYOUT], dtype=torch.long)
    tool = torch.tensor([[c == "o" for c in row] for row in LAYOUT], dtype=torch.long)
    return mask, tool


def policy_positions(i: int) -> list[int]:
    return [t for t, c in enumerate(LAYOUT[i]) if c == "p"]


def make_batch(gen: torch.Generator, tool: bool = True) -> RolloutBatch:
    mask, tool_mask = layout_masks()
    logprobs = -torch.rand(N, T, generator=gen) * 3
    logprobs = torch.where(tool_mask.bool() | ~mask.bool(), torch.zeros(()), logprobs)  # the contract: 0 there
    return RolloutBatch(prompt_ids=torch.ones(N, 2, dtype=torch.long), prompt_mask=torch.ones(N, 2, dtype=torch.long),
                        response_ids=torch.randint(3, 20, (N, T), generator=gen) * mask, mask=mask,
                        logprobs=logprobs, stop_reason=torch.full((N,), STOP_EOS),
                        tool_mask=tool_mask if tool else None)


def perturb_at_observations(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    _, tool_mask = layout_masks()
    return torch.where(tool_mask.bool(), torch.randn(x.shape, generator=gen) * 5, x)


def brute_agg(x: torch.Tensor, agg: str) -> float:
    """The four aggregations written out in float64 over policy tokens only."""
    rows = [[float(x[i, t]) for t in policy_positions(i)] for i in range(N)]
    if agg == "token-mean":
        return sum(map(sum, rows)) / sum(map(len, rows))
    if agg == "seq-mean-token-mean":
        nonempty = [r for r in rows if r]
        return sum(sum(r) / len(r) for r in nonempty) / len(nonempty)
    if agg == "seq-mean-token-sum":
        return sum(map(sum, rows)) / N
    return sum(map(sum, rows)) / (N * NORM_L)  # Dr. GRPO: the constant policy-token budget L


def trainer_denominator(agg: str, mask: torch.Tensor) -> float:
    """The trainer's own minibatch denominator (LearnPhases._denominator) for `agg`."""
    return LearnPhases._denominator(SimpleNamespace(cfg=SimpleNamespace(algo=SimpleNamespace(loss_agg=agg))), mask)


def grpo_inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    batch = make_batch(gen)
    step = StepData(batch=batch)
    step.advantages = torch.randn(N, generator=gen)
    step.ref_logprobs = -torch.rand(N, T, generator=gen) * 3
    old = batch.logprobs.clone() + 0.1 * torch.randn(N, T, generator=gen)
    logp = (batch.logprobs + 0.2 * torch.randn(N, T, generator=gen)).requires_grad_(True)
    ent = (torch.rand(N, T, generator=gen) * 2).requires_grad_(True)
    return gen, step, old, logp, ent


def test_loss_mask_is_mask_and_not_tool_mask():
    gen = torch.Generator().manual_seed(0)
    step = StepData(batch=make_batch(gen))
    expected = torch.tensor([[c == "p" for c in row] for row in LAYOUT], dtype=torch.long)
    assert torch.equal(step.mask, expected) and step.mask.dtype == step.batch.mask.dtype
    assert torch.equal(step.batch.attention_mask[:, 2:], layout_masks()[0])  # the forward still sees observations
    plain = StepData(batch=make_batch(gen, tool=False))
    assert plain.mask is plain.batch.mask  # no tools: exactly as before


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_grpo_loss_kl_entropy_and_denominators_count_policy_tokens_only(agg):
    beta, ent_coef, clip = 0.1, 0.01, 0.2
    algo = GRPOAlgorithm(GRPOAlgoConfig(group_size=2, kl_coef=beta, kl_estimator="k3", entropy_coef=ent_coef,
                                        loss_agg=agg, loss_norm_length=NORM_L, clip_low=clip, clip_high=clip))
    _, step, old, logp, ent = grpo_inputs(1)
    rows = torch.arange(N)
    denom = trainer_denominator(agg, step.mask)
    expected_denom = {"token-mean": sum(len(policy_positions(i)) for i in range(N)), "seq-mean-token-mean": N,
                      "seq-mean-token-sum": N, "seq-mean-token-sum-norm": N}[agg]
    assert denom == expected_denom
    loss, metrics = algo.loss(ForwardOutput(logprobs=logp, entropy=ent), step, rows, old, denom, 0.0)

    lp, o, ref, adv = logp.detach().double(), old.double(), step.ref_logprobs.double(), step.advantages.double()
    pg = torch.zeros(N, T, dtype=torch.float64)
    kl = torch.zeros(N, T, dtype=torch.float64)
    for i in range(N):
        for t in policy_positions(i):
            r = math.exp(lp[i, t] - o[i, t])
            a = float(adv[i])
            pg[i, t] = max(-a * r, -a * min(max(r, 1 - clip), 1 + clip))
            d = float(ref[i, t] - lp[i, t])
            kl[i, t] = math.exp(d) - d - 1
    expected = brute_agg(pg, agg) + beta * brute_agg(kl, agg) - ent_coef * brute_agg(ent.detach().double(), agg)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert float(metrics["loss/kl"]) == pytest.approx(brute_agg(kl, agg), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_values_at_observation_positions_change_neither_loss_nor_gradient(agg):
    algo = GRPOAlgorithm(GRPOAlgoConfig(group_size=2, kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01,
                                        loss_agg=agg, loss_norm_length=NORM_L))
    gen, step, old, logp, ent = grpo_inputs(2)
    rows, denom = torch.arange(N), trainer_denominator(agg, step.mask)
    loss, _ = algo.loss(ForwardOutput(logprobs=logp, entropy=ent), step, rows, old, denom, 0.0)
    g_logp, g_ent = torch.autograd.grad(loss, (logp, ent))

    # every log-prob at an observation position (old, reference, the forward's own) and the entropy there
    step.ref_logprobs = perturb_at_observations(step.ref_logprobs, gen)
    logp2 = perturb_at_observations(logp.detach(), gen).requires_grad_(True)
    ent2 = perturb_at_observations(ent.detach(), gen).requires_grad_(True)
    loss2, _ = algo.loss(ForwardOutput(logprobs=logp2, entropy=ent2), step, rows,
                         perturb_at_observations(old, gen), denom, 0.0)
    g_logp2, g_ent2 = torch.autograd.grad(loss2, (logp2, ent2))
    assert torch.equal(loss, loss2)
    assert torch.equal(g_logp, g_logp2) and torch.equal(g_ent, g_ent2)
    obs = layout_masks()[1].bool()
    assert (g_logp[obs] == 0).all() and (g_ent[obs] == 0).all()
    assert (g_logp[step.mask.bool()] != 0).any()


def brute_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list[float], list[float]]:
    """GAE over one row's policy tokens (in order), the value after the last one 0, in float64."""
    k = len(rewards)
    deltas = [rewards[j] + gamma * (values[j + 1] if j + 1 < k else 0.0) - values[j] for j in range(k)]
    adv = [sum((gamma * lam) ** (m - j) * deltas[m] for m in range(j, k)) for j in range(k)]
    return adv, [a + v for a, v in zip(adv, values)]


def test_ppo_kl_shaping_and_gae_bridge_observation_holes():
    gamma, lam, kl_coef = 0.9, 0.8, 0.2
    algo = PPOAlgorithm(PPOAlgoConfig(gamma=gamma, lam=lam, kl_coef=kl_coef, whiten_advantages=False))
    gen = torch.Generator().manual_seed(3)
    step = StepData(batch=make_batch(gen))
    step.scores = torch.randn(N, generator=gen)
    step.valid = torch.ones(N, dtype=torch.bool)
    step.train_rows = torch.arange(N)
    step.old_logprobs = -torch.rand(N, T, generator=gen) * 3
    step.ref_logprobs = -torch.rand(N, T, generator=gen) * 3
    step.values = torch.randn(N, T, generator=gen)
    # what sits at observation positions must not matter: large garbage there
    step.old_logprobs = perturb_at_observations(step.old_logprobs, gen) * 10
    step.values = perturb_at_observations(step.values, gen) * 10
    metrics = algo.shape_rewards(step)
    algo.compute_advantages(step)

    kl_sums = []
    for i in range(N):
        pos = policy_positions(i)
        kl = [float(step.old_logprobs[i, t]) - float(step.ref_logprobs[i, t]) for t in pos]
        kl_sums.append(sum(kl))
        rewards = [-kl_coef * k for k in kl]
        rewards[-1] += float(step.scores[i])  # the score sits on the last policy token (not a trailing observation)
        adv, ret = brute_gae(rewards, [float(step.values[i, t]) for t in pos], gamma, lam)
        for j, t in enumerate(pos):
            assert float(step.token_rewards[i, t]) == pytest.approx(rewards[j], rel=1e-5, abs=1e-6)
            assert float(step.advantages[i, t]) == pytest.approx(adv[j], rel=1e-5, abs=1e-5)
            assert float(step.returns[i, t]) == pytest.approx(ret[j], rel=1e-5, abs=1e-5)
        others = [t for t in range(T) if t not in pos]
        assert all(float(step.advantages[i, t]) == 0 and float(step.returns[i, t]) == 0
                   and float(step.token_rewards[i, t]) == 0 for t in others)
    assert metrics["kl/mean_seq"] == pytest.approx(sum(kl_sums) / N, rel=1e-5)


def test_ppo_loss_counts_policy_tokens_only():
    clip, vclip, vf_coef = 0.2, 0.2, 0.5
    algo = PPOAlgorithm(PPOAlgoConfig(kl_coef=0.0, vf_coef=vf_coef, value_clip=vclip, whiten_advantages=False))
    gen = torch.Generator().manual_seed(4)
    step = StepData(batch=make_batch(gen))
    step.advantages = torch.randn(N, T, generator=gen)
    step.values = torch.randn(N, T, generator=gen)
    step.returns = torch.randn(N, T, generator=gen)
    old = -torch.rand(N, T, generator=gen) * 3
    logp = (old + 0.3 * torch.randn(N, T, generator=gen)).requires_grad_(True)
    values = (step.values + 0.4 * torch.randn(N, T, generator=gen)).requires_grad_(True)
    denom = trainer_denominator("token-mean", step.mask)
    loss, _ = algo.loss(ForwardOutput(logprobs=logp, values=values), step, torch.arange(N), old, denom,
                        float(step.mask.sum()))  # vf_denom as _optimizer_step passes it
    pg, vf, count = 0.0, 0.0, 0
    lp, vals = logp.detach(), values.detach()
    for i in range(N):
        for t in policy_positions(i):
            r, a = math.exp(float(lp[i, t]) - float(old[i, t])), float(step.advantages[i, t])
            pg += max(-a * r, -a * min(max(r, 1 - clip), 1 + clip))
            v, v_old, ret = float(vals[i, t]), float(step.values[i, t]), float(step.returns[i, t])
            v_clipped = v_old + min(max(v - v_old, -vclip), vclip)
            vf += 0.5 * max((v - ret) ** 2, (v_clipped - ret) ** 2)
            count += 1
    assert float(loss.detach()) == pytest.approx(pg / count + vf_coef * vf / count, rel=1e-5)
    g_values = torch.autograd.grad(loss, values)[0]
    assert (g_values[layout_masks()[1].bool()] == 0).all()  # no value target at an observation position


def test_concat_and_select_keep_tool_mask():
    gen = torch.Generator().manual_seed(5)
    tools, plain = make_batch(gen), make_batch(gen, tool=False)
    joined = RolloutBatch.concat([plain, tools])
    assert torch.equal(joined.tool_mask[:N], torch.zeros(N, T, dtype=torch.long))  # a tool-free part: no holes
    assert torch.equal(joined.tool_mask[N:], tools.tool_mask)
    assert torch.equal(joined.select([5, 6]).tool_mask, tools.tool_mask[1:3])
    assert RolloutBatch.concat([plain, plain]).tool_mask is None


def test_a_saved_step_state_restores_with_its_loss_mask():
    # align.trainer.async_rollouts saves a queued step as its dataclass fields and rebuilds it from them
    from dataclasses import fields

    from align.trainer.async_rollouts import _stepdata_from

    step = StepData(batch=make_batch(torch.Generator().manual_seed(6)))
    expected = step.mask.clone()
    batch = {f.name: getattr(step.batch, f.name) for f in fields(step.batch)}
    restored = _stepdata_from({"batch": batch, **{f.name: getattr(step, f.name) for f in fields(step) if f.name != "batch"}})
    assert torch.equal(restored.mask, expected) and torch.equal(restored.batch.tool_mask, step.batch.tool_mask)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_two_ranks_losses_with_global_denominators_sum_to_the_policy_token_loss(agg):
    """Each rank holds two rows; its denominator is summed over ranks (align.distributed.batches.global_sums, as
    LearnPhases._optimizer_step does): the ranks' losses add up to the formula over every policy token."""
    from dataclasses import dataclass

    from align.distributed.batches import global_sums
    from align.distributed.context import DistContext

    @dataclass(frozen=True)
    class TwoRanks(DistContext):
        peer: object = None

        def all_reduce_sum(self, tensor):
            return tensor + self.peer

    algo = GRPOAlgorithm(GRPOAlgoConfig(group_size=2, loss_agg=agg, clip_low=0.2, clip_high=0.2))
    _, step, old, logp, _ = grpo_inputs(7)
    logp = logp.detach()
    halves = [torch.arange(0, 2), torch.arange(2, 4)]
    local = [trainer_denominator(agg, step.mask[rows]) for rows in halves]
    total = 0.0
    for rank, rows in enumerate(halves):
        ctx = TwoRanks(rank=rank, world_size=2, peer=torch.tensor([local[1 - rank]], dtype=torch.float64))
        (denom,) = global_sums(ctx, local[rank])
        sub = StepData(batch=step.batch.select(rows))
        sub.advantages = step.advantages[rows]
        loss, _ = algo.loss(ForwardOutput(logprobs=logp[rows]), sub, torch.arange(2), old[rows], denom, 0.0)
        total += float(loss)
    pg = torch.zeros(N, T, dtype=torch.float64)
    for i in range(N):
        for t in policy_positions(i):
            r, a = math.exp(float(logp[i, t]) - float(old[i, t])), float(step.advantages[i])
            pg[i, t] = max(-a * r, -a * min(max(r, 0.8), 1.2))
    assert total == pytest.approx(brute_agg(pg, agg), rel=1e-5)
