"""Dr. GRPO's `seq-mean-token-sum-norm` divides by a constant of the run, `algo.loss_norm_length` (default
rollout.max_new_tokens), never by the width of the step's padded response tensor (Liu et al. 2025, arXiv
2503.20783; TRL max_completion_length, verl loss_scale_factor).

The trainers' whole loss (clipped surrogate + KL term + entropy bonus) is checked against a float64 reference
written token by token from the formula sum(loss * mask) / (B * L), for two padding widths of the same batch.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from align.config import GRPOAlgoConfig, GRPOConfig, PPOConfig, as_config
from align.errors import ConfigError
from align.trainer.forward import ForwardOutput
from align.trainer.grpo import GRPOAlgorithm
from align.trainer.ppo import PPOAlgorithm
from align.trainer.state import StepData

AGG = "seq-mean-token-sum-norm"
LENGTHS = [3, 5, 1, 0, 4]  # response lengths of the 5 rows (one empty row); the longest is 5
B, V = len(LENGTHS), 6
MAX_NEW_TOKENS = 12
CLIP_LOW, CLIP_HIGH, KL_COEF, ENT_COEF = 0.2, 0.28, 0.07, 0.03


def run_config(algorithm: str, **algo):
    cls = GRPOConfig if algorithm == "grpo" else PPOConfig
    algo = {"loss_agg": AGG, "clip_low": CLIP_LOW, "clip_high": CLIP_HIGH, "kl_coef": KL_COEF,
            "entropy_coef": ENT_COEF, "kl_estimator": "k3", **algo}
    if algorithm == "ppo":
        algo["kl_in"] = "loss"
    return cls(model={"path": "m"}, data={"path": "d.jsonl"}, reward={"functions": ["math_verify"]},
               rollout={"max_new_tokens": MAX_NEW_TOKENS}, algo=algo)


def make(algorithm: str, **algo):
    cfg = run_config(algorithm, **algo)
    return (GRPOAlgorithm if algorithm == "grpo" else PPOAlgorithm)(cfg.algo)


def raw_batch(seed: int = 0):
    """The unpadded batch: per row, lists of (logits [V], token, old logp, ref logp, token advantage)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in LENGTHS:
        rows.append({
            "logits": torch.randn(n, V, generator=g, dtype=torch.float64),
            "tokens": torch.randint(0, V, (n,), generator=g),
            "old": torch.randn(n, generator=g, dtype=torch.float64) * 0.3 - 1.8,
            "ref": torch.randn(n, generator=g, dtype=torch.float64) * 0.3 - 1.8,
            "adv_tok": torch.randn(n, generator=g, dtype=torch.float64),
        })
    adv_seq = torch.randn(B, generator=g, dtype=torch.float64)
    return rows, adv_seq


def padded(rows, width: int, pad_value: float = 0.0):
    """The same batch right-padded to `width` tokens (padding holds junk, which must never be read)."""
    logits = torch.full((B, width, V), pad_value, dtype=torch.float64)
    tokens = torch.zeros(B, width, dtype=torch.long)
    old = torch.full((B, width), pad_value, dtype=torch.float64)
    ref = torch.full((B, width), pad_value, dtype=torch.float64)
    adv_tok = torch.full((B, width), pad_value, dtype=torch.float64)
    mask = torch.zeros(B, width, dtype=torch.float64)
    for i, r in enumerate(rows):
        n = r["tokens"].numel()
        logits[i, :n], tokens[i, :n], old[i, :n], ref[i, :n], adv_tok[i, :n] = (
            r["logits"], r["tokens"], r["old"], r["ref"], r["adv_tok"])
        mask[i, :n] = 1
    return logits, tokens, old, ref, adv_tok, mask


def trainer_loss(algo, algorithm: str, rows, adv_seq, width: int) -> float:
    logits, tokens, old, ref, adv_tok, mask = padded(rows, width, pad_value=3.0)
    logp_all = torch.log_softmax(logits, -1)
    fwd = ForwardOutput(logprobs=logp_all.gather(-1, tokens[..., None]).squeeze(-1),
                        entropy=-(logp_all.exp() * logp_all).sum(-1))
    step = StepData(batch=SimpleNamespace(mask=mask))
    step.ref_logprobs = ref
    step.advantages = adv_seq if algorithm == "grpo" else adv_tok
    # the trainer's minibatch denominator for the token-sum modes is the number of rows (Trainer._denominator)
    loss, _ = algo.loss(fwd, step, torch.arange(B), old, float(B), vf_denom=float(mask.sum()))
    return float(loss)


def reference_loss(algorithm: str, rows, adv_seq, norm_length: int) -> float:
    """sum over response tokens of (PPO-clip + beta * k3 - c_ent * entropy) / (B * L), in python floats."""
    total = 0.0
    for i, r in enumerate(rows):
        for t in range(r["tokens"].numel()):
            z = r["logits"][t].tolist()
            zmax = max(z)
            lse = zmax + math.log(sum(math.exp(v - zmax) for v in z))
            logp_all = [v - lse for v in z]
            logp = logp_all[int(r["tokens"][t])]
            entropy = -sum(math.exp(lp) * lp for lp in logp_all)
            a = float(adv_seq[i]) if algorithm == "grpo" else float(r["adv_tok"][t])
            ratio = math.exp(logp - float(r["old"][t]))
            pg = max(-a * ratio, -a * min(max(ratio, 1 - CLIP_LOW), 1 + CLIP_HIGH))
            d = float(r["ref"][t]) - logp
            k3 = math.exp(d) - d - 1
            total += pg + KL_COEF * k3 - ENT_COEF * entropy
    return total / (B * norm_length)


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_dr_grpo_loss_does_not_depend_on_the_padding_width(algorithm):
    rows, adv_seq = raw_batch(seed=1 + (algorithm == "ppo"))
    algo = make(algorithm)
    narrow = trainer_loss(algo, algorithm, rows, adv_seq, width=max(LENGTHS))
    wide = trainer_loss(algo, algorithm, rows, adv_seq, width=max(LENGTHS) + 4)
    want = reference_loss(algorithm, rows, adv_seq, norm_length=MAX_NEW_TOKENS)
    assert abs(want) > 1e-3  # not trivially zero
    assert narrow == pytest.approx(wide, rel=1e-12, abs=1e-15), "the loss changed with the padding width"
    assert narrow == pytest.approx(want, rel=1e-12, abs=1e-15), "normaliser is not B * rollout.max_new_tokens"


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_dr_grpo_loss_scales_as_one_over_loss_norm_length(algorithm):
    rows, adv_seq = raw_batch(seed=3)
    losses = {}
    for norm_length in (7, 14, 35):
        algo = make(algorithm, loss_norm_length=norm_length)
        losses[norm_length] = trainer_loss(algo, algorithm, rows, adv_seq, width=max(LENGTHS) + 2)
        want = reference_loss(algorithm, rows, adv_seq, norm_length=norm_length)
        assert losses[norm_length] == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert losses[7] / losses[14] == pytest.approx(2.0, rel=1e-12)
    assert losses[7] / losses[35] == pytest.approx(5.0, rel=1e-12)


def test_loss_norm_length_defaults_to_max_new_tokens_and_is_validated():
    assert run_config("grpo").algo.loss_norm_length == MAX_NEW_TOKENS
    assert run_config("ppo").algo.loss_norm_length == MAX_NEW_TOKENS
    assert run_config("grpo", loss_norm_length=100).algo.loss_norm_length == 100
    for bad in (0, -3):
        with pytest.raises(ConfigError) as err:
            run_config("grpo", loss_norm_length=bad)
        msg = str(err.value)
        assert "\n" not in msg and "algo.loss_norm_length" in msg and "> 0" in msg, msg


def test_a_defaulted_loss_norm_length_follows_max_new_tokens_overrides_and_shared_sections():
    cfg = run_config("grpo")
    assert as_config(cfg, ["rollout.max_new_tokens=40"]).algo.loss_norm_length == 40
    assert as_config(cfg, ["train.lr=1e-5"]).algo.loss_norm_length == MAX_NEW_TOKENS
    explicit = run_config("grpo", loss_norm_length=9)
    assert as_config(explicit, ["rollout.max_new_tokens=40"]).algo.loss_norm_length == 9
    section = GRPOAlgoConfig(loss_agg=AGG)  # one section object in two run configs
    short, long = (GRPOConfig(model={"path": "m"}, data={"path": "d.jsonl"}, reward={"functions": ["math_verify"]},
                              rollout={"max_new_tokens": n}, algo=section) for n in (8, 32))
    assert (short.algo.loss_norm_length, long.algo.loss_norm_length, section.loss_norm_length) == (8, 32, None)
