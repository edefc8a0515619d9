"""Faithfulness of CD-RLHF and GvU to their papers' / released code's formulas (PAPERS.md §2, §3), against
float64 references written from those formulas, through the real pipeline pieces (rollout gate, reference
states, reward shaping, the understanding reward)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from align import algos
from align.rewards.curiosity import CuriosityModule
from align.rewards.understanding import UnderstandingReward
from align.rollouts import RolloutEngine, SamplingParams
from align.testing import make_tiny_model
from align.trainer.forward import position_ids_from_mask, response_forward


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("faith") / "m", hidden_size=32, num_layers=2, num_heads=2, seed=3)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():  # a peaked policy (as after SFT), so top-1 and non-top-1 tokens both occur
        model.lm_head.weight.mul_(10.0)
    return model, AutoTokenizer.from_pretrained(path)


def _rollout(model, tok, k: int, temperature: float, top_p: float = 1.0):
    engine = RolloutEngine(model, tok, gate_top_k=k)
    params = SamplingParams(max_new_tokens=12, temperature=temperature, top_p=top_p)
    return engine.generate(["ab", "hello th", "x", "qq r"] * 8, params, generator=torch.Generator().manual_seed(0))


def _teacher_forced_logits64(model, batch) -> torch.Tensor:
    """float64 logits of the positions that sampled each response token ([N, T, V])."""
    ids = torch.cat([batch.prompt_ids, batch.response_ids], dim=1)
    att = torch.cat([batch.prompt_mask, batch.mask], dim=1)
    m64 = AutoModelForCausalLM.from_config(model.config).double()
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    with torch.no_grad():
        logits = m64(input_ids=ids, attention_mask=att, position_ids=position_ids_from_mask(att)).logits
    p, t = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    return logits[:, p - 1:p + t - 1]


@pytest.mark.parametrize("k,temperature,top_p", [(1, 0.8, 1.0), (1, 1.0, 0.9), (3, 1.0, 1.0)])
def test_rollout_gate_is_the_sampled_tokens_rank_in_float64(tiny, k, temperature, top_p):
    """CD-RLHF pays the bonus only where the sampled token is NOT in the top-k of the sampling distribution:
    the rollout's topk_hit must equal rank(token) < k from a float64 teacher-forced pass (temperature and
    top-p keep the order of the surviving tokens)."""
    model, tok = tiny
    batch = _rollout(model, tok, k, temperature, top_p)
    logits = _teacher_forced_logits64(model, batch)
    chosen = logits.gather(-1, batch.response_ids.unsqueeze(-1))
    rank = (logits > chosen).sum(-1)
    # near-ties (another logit within float32 noise of the chosen one) could rank either way: leave those out
    gap = (logits - chosen).abs().scatter(-1, batch.response_ids.unsqueeze(-1), math.inf)
    near = gap.min(-1).values < 1e-4
    keep = batch.mask.bool() & ~near
    assert int(keep.sum()) > 60 and int((batch.mask.bool() & near).sum()) <= 10
    expected = rank < k
    assert torch.equal(batch.topk_hit[keep], expected[keep])
    assert 0 < int(expected[keep].sum()) < int(keep.sum())  # both gate states occur in the sample
    assert not bool(batch.topk_hit[~batch.mask.bool()].any())  # padding is never a hit


def test_reference_states_are_the_released_hidden_state_slices(tiny):
    """s_t = hidden_states[-1][:, P-1+t] and s_{t+1} = hidden_states[-1][:, P+t] (the released code's
    hidden_states[:, start:-1] / [:, start+1:] with start = P-1), in float64."""
    model, tok = tiny
    batch = _rollout(model, tok, 1, 1.0)
    ids = torch.cat([batch.prompt_ids, batch.response_ids], dim=1)
    att = torch.cat([batch.prompt_mask, batch.mask], dim=1)
    m64 = AutoModelForCausalLM.from_config(model.config).double()
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    t = batch.response_ids.shape[1]
    with torch.no_grad():
        ours = response_forward(m64, ids, att, t, return_hidden=True).hidden
        full = m64(input_ids=ids, attention_mask=att, position_ids=position_ids_from_mask(att),
                   output_hidden_states=True).hidden_states[-1]
    start = batch.prompt_ids.shape[1] - 1
    assert ours.shape == (ids.shape[0], t + 1, model.config.hidden_size)
    np.testing.assert_allclose(ours[:, :-1].numpy(), full[:, start:-1].numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours[:, 1:].numpy(), full[:, start + 1:].numpy(), rtol=0, atol=1e-12)


def _mlp64(seq: torch.nn.Sequential, x: np.ndarray) -> np.ndarray:
    linears = [m for m in seq if isinstance(m, torch.nn.Linear)]
    for i, lin in enumerate(linears):
        x = x @ lin.weight.detach().double().numpy().T + lin.bias.detach().double().numpy()
        if i < len(linears) - 1:
            x = np.maximum(x, 0.0)
    return x


def test_token_rewards_equal_the_papers_formula_in_float64():
    """r_t = -kl_coef * (logp_t - ref_logp_t) + eta * gate_t * whiten(0.5 * ||phi(s_{t+1}) - f(phi(s_t), a_t)||)_t,
    plus clip(score, -2.5, 2.5) on the last response token (PAPERS.md §2), end to end from the ICM's weights."""
    g = torch.Generator().manual_seed(11)
    n, t, h, a, inter = 4, 6, 8, 5, 16
    states = torch.randn(n, t + 1, h, generator=g)
    actions = torch.randn(n, t, a, generator=g)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4, [1] * 5 + [0]])
    hit = torch.rand(n, t, generator=g) < 0.7
    logp, ref = -torch.rand(n, t, generator=g) * 3, -torch.rand(n, t, generator=g) * 3
    scores = torch.tensor([3.7, -0.4, -9.0, 1.25])
    eta, kl_coef = 0.05, 0.1
    module = CuriosityModule(h, a, inter, eta=eta, seed=2)
    out = module.compute(states, actions, mask, hit)
    got = algos.shaped_token_rewards(scores, mask, kl=torch.where(mask.bool(), logp - ref, torch.zeros(())),
                                     kl_coef=kl_coef, intrinsic=out.intrinsic, eta=eta, score_clip=2.5)
    # float64 reference
    phi = _mlp64(module.icm.encoder, states.double().numpy())
    pred = _mlp64(module.icm.forward_model, np.concatenate([phi[:, :-1], actions.double().numpy()], -1))
    err = 0.5 * np.linalg.norm(phi[:, 1:] - pred, axis=-1)
    m = mask.numpy().astype(bool)
    white = (err - err[m].mean()) / math.sqrt(err[m].var() + 1e-8)
    gate = m & ~hit.numpy()
    expected = -kl_coef * (logp.double().numpy() - ref.double().numpy()) + eta * np.where(gate, white, 0.0)
    expected = np.where(m, expected, 0.0)
    last = m.sum(1) - 1
    expected[np.arange(n), last] += np.clip(scores.double().numpy(), -2.5, 2.5)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5, atol=1e-6)
    # and the ICM loss the optimizer sees is the masked mean of the same errors (released: L2 norm, not squared)
    assert float(module.loss(states, actions, mask)) == pytest.approx(err[m].mean(), rel=1e-5)


def _released_raw_product(token_logprobs: list[float], dtype) -> float:
    """The released GvU code: multiply the raw probabilities, then take the 1/L-th power."""
    p = torch.tensor(token_logprobs, dtype=dtype).exp()
    return float(torch.prod(p) ** (1.0 / len(token_logprobs)))


def test_gvu_log_space_reward_equals_the_released_raw_product_where_finite(toy_umm_path):
    """R = (prod_j p_j)^(1/L): our exp(mean log p) and the released raw product agree wherever the product
    does not underflow; where it does (long captions), the raw product gives 0 and ours the true value."""
    import random

    model = AutoModelForCausalLM.from_pretrained(toy_umm_path).eval()
    layout = model.config.umm
    rng = random.Random(1)
    images = [[rng.choice(layout["image_token_ids"]) for _ in range(layout["num_image_tokens"])] for _ in range(4)]
    short = ["a circle", "two squares", "a red circle left of a blue triangle", "a triangle"]
    reward = UnderstandingReward(model_path=str(toy_umm_path))
    out = reward.score([c + " <boi>" for c in short], ["x"] * 4, completion_ids=images)
    for score, info in zip(out.scores, out.info):
        lps = info["token_logprobs"]
        raw64 = _released_raw_product(lps, torch.float64)
        assert raw64 > 0.0
        assert score == pytest.approx(raw64, rel=1e-9)
        assert score == pytest.approx(math.exp(math.fsum(lps) / len(lps)), rel=1e-12)
        raw32 = _released_raw_product(lps, torch.float32)
        if raw32 > 0.0:  # the released code in float32 also agrees wherever its product is still finite
            assert score == pytest.approx(raw32, rel=1e-4)
    long_caption = " and ".join(["a red circle left of a blue triangle"] * 6)
    out = reward.score([long_caption + " <boi>"], ["x"], completion_ids=images[:1])
    lps = out.info[0]["token_logprobs"]
    assert _released_raw_product(lps, torch.float32) == 0.0  # underflow: the released form loses the reward
    expected = math.exp(math.fsum(lps) / len(lps))
    assert out.scores[0] == pytest.approx(expected, rel=1e-12) and 0.0 < out.scores[0] < 1.0
