"""Packing on / off and token-budget / fixed micro-batches take the same step: the trainer's log-probs, values,
losses and gradients equal an independent computation that runs each unpadded sequence alone (float32)."""
from __future__ import annotations

import copy

import pytest
import torch

import align
from align.testing import tiny_run_config
from align.trainer.forward import ForwardOutput
from align.trainer.packing import pack

pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")

MODES = {  # (pack_sequences, max_tokens_per_micro_batch); micro_batch_size is 3
    "unpacked-fixed": (False, 0), "packed-fixed": (True, 0), "unpacked-budget": (False, 60),
    "packed-budget": (True, 40),
}


def distinct_chars(prompts, completions, **kwargs):
    return [len(set(c)) / max(len(c), 1) for c in completions]


def make_step(model_path, data, run_dir, algorithm, **sections):
    base = {"rollout": {"max_new_tokens": 10}, "train": {"prompts_per_step": 4, "micro_batch_size": 3,
                                                        "max_grad_norm": 1e9, "lr": 1e-2}}
    trainer = align.Trainer(tiny_run_config(algorithm, model_path, data, run_dir, distinct_chars, base, **sections))
    trainer.optimizer.step = lambda: None  # the gradients are under test; the weights must stay those of the reference
    step, _ = trainer.phase_generate()
    trainer.phase_score(step)
    # mixed response lengths (1 .. 10, the EOS-stopped rows of a real batch) over the engine's left-padded prompts
    b = step.batch
    lengths = torch.tensor([(3 * i) % 10 + 1 for i in range(len(b))])
    keep = torch.arange(b.mask.shape[1])[None] < lengths[:, None]
    b.mask = b.mask * keep
    b.response_ids = torch.where(keep, b.response_ids, torch.full_like(b.response_ids, trainer.models.tokenizer.pad_token_id))
    b.logprobs = b.logprobs * keep
    # and prompts of several lengths: drop each row's first i % 3 prompt tokens, left padding in their place
    width = b.prompt_ids.shape[1]
    real_from = width - b.prompt_mask.sum(-1) + torch.arange(len(b)) % 3
    prompt_keep = torch.arange(width)[None] >= real_from[:, None]
    b.prompt_mask = b.prompt_mask * prompt_keep
    b.prompt_ids = torch.where(prompt_keep, b.prompt_ids, torch.full_like(b.prompt_ids, trainer.models.tokenizer.pad_token_id))
    assert len(set(b.prompt_mask.sum(-1).tolist())) == 3
    return trainer, step


def set_mode(trainer, mode):
    trainer.cfg.train.pack_sequences, trainer.cfg.train.max_tokens_per_micro_batch = MODES[mode]


def alone(trainer, step, rows, model=None, with_values=True):
    """Each row's unpadded sequence through the model alone (batch 1, no mask, default positions): [n, T] outputs."""
    models = trainer.models
    model = model if model is not None else models.policy
    b = step.batch
    n, t = len(rows), b.mask.shape[1]
    logp, ent, values = torch.zeros(n, t), torch.zeros(n, t), torch.zeros(n, t)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for k, i in enumerate(rows.tolist()):
        prompt = b.prompt_ids[i][b.prompt_mask[i].bool()]
        r = int(b.mask[i].sum())
        seq = torch.cat([prompt, b.response_ids[i, :r]])[None]
        hidden = base.get_decoder()(input_ids=seq).last_hidden_state[0, len(prompt) - 1:-1]
        lp = torch.log_softmax(base.get_output_embeddings()(hidden).float(), -1)
        logp[k, :r] = lp.gather(-1, seq[0, len(prompt):, None]).squeeze(-1)
        ent[k, :r] = -(lp.exp() * lp).sum(-1)
        if with_values and models.value_head is not None:
            values[k, :r] = models.value_head(hidden)
        if with_values and models.critic is not None:
            h = models.critic.backbone(input_ids=seq).last_hidden_state[0, len(prompt) - 1:-1]
            values[k, :r] = models.critic.head(h)
    return ForwardOutput(logprobs=logp, entropy=ent, values=values if (models.value_head or models.critic) is not None else None)


def masked(x, mask):
    return torch.where(mask.bool(), x, torch.zeros_like(x))


def check_logprobs_phase(trainer, step):
    """phase_logprobs in every mode equals the per-sample forward on the response tokens."""
    rows = torch.arange(len(step.batch))
    with torch.no_grad():
        ref = alone(trainer, step, rows)
        with trainer.models.reference_mode() as ref_model:
            ref_ref = alone(trainer, step, rows, model=ref_model, with_values=False)
    for mode in MODES:
        set_mode(trainer, mode)
        s = copy.copy(step)
        trainer.phase_logprobs(s)
        if s.old_logprobs is not None and trainer._needs_old_logprobs():
            torch.testing.assert_close(masked(s.old_logprobs, s.mask), ref.logprobs, rtol=0, atol=2e-6, msg=mode)
        if s.ref_logprobs is not None:
            torch.testing.assert_close(masked(s.ref_logprobs, s.mask), ref_ref.logprobs, rtol=0, atol=2e-6, msg=mode)
        if ref.values is not None:
            torch.testing.assert_close(masked(s.values, s.mask), ref.values, rtol=0, atol=1e-6, msg=mode)


def check_update(trainer, step, denom):
    """_optimizer_step's losses and gradients in every mode equal one unaccumulated loss over the per-sample
    forwards of the whole minibatch (the algorithm's loss with the minibatch's denominators)."""
    set_mode(trainer, "unpacked-fixed")
    trainer.phase_logprobs(step)
    trainer.phase_advantages(step)
    mini = step.train_rows
    assert mini.numel() >= 8
    b = step.batch
    # rows do share: packing the minibatch saves rows (so cross-sample attention would show)
    assert pack(b.input_ids[mini], b.attention_mask[mini], varlen=False).input_ids.shape[0] <= mini.numel() - 3
    params = dict(trainer.models.policy.named_parameters()) | {
        f"vh.{k}": p for k, p in (trainer.models.value_head.named_parameters() if trainer.models.value_head else [])
    } | {f"critic.{k}": p for k, p in (trainer.models.critic.named_parameters() if trainer.models.critic else [])}
    params = {k: p for k, p in params.items() if p.requires_grad}
    for p in params.values():
        p.grad = None
    fwd = alone(trainer, step, mini)
    mask = step.mask[mini]
    old = step.old_logprobs[mini] if step.old_logprobs is not None else fwd.logprobs.detach()
    loss, metrics = trainer.algo.loss(fwd, step, mini, old, denom(mask), float(mask.sum()))
    loss.backward()
    ref_grads = {k: p.grad.clone() for k, p in params.items()}
    ref_entropy = float((fwd.entropy.detach() * mask).sum() / mask.sum())
    for mode in MODES:
        set_mode(trainer, mode)
        out = trainer._optimizer_step(step, mini)
        for key in metrics:
            if key.startswith("loss/"):
                assert out[key] == pytest.approx(float(metrics[key]), abs=1e-6), (mode, key)
        assert out["policy/entropy"] == pytest.approx(ref_entropy, abs=1e-6), mode
        for k, p in params.items():
            torch.testing.assert_close(p.grad, ref_grads[k], rtol=0, atol=1e-6, msg=f"{mode} {k}")


def test_grpo_packing_and_budget_equal_per_sample(tiny_model_path, arithmetic_data, tmp_path):
    trainer, step = make_step(tiny_model_path, arithmetic_data["prompts"], tmp_path / "run", "grpo",
                              algo={"group_size": 4, "kl_coef": 0.05, "entropy_coef": 0.01,
                                    "loss_agg": "seq-mean-token-mean", "filter_zero_variance": False})
    check_logprobs_phase(trainer, step)
    check_update(trainer, step, lambda mask: float((mask.sum(-1) > 0).sum()))


@pytest.mark.parametrize("critic", ["value_head", "separate"])
def test_ppo_packing_and_budget_equal_per_sample(critic, tiny_model_path, arithmetic_data, tmp_path):
    trainer, step = make_step(tiny_model_path, arithmetic_data["prompts"], tmp_path / "run", "ppo",
                              model={"path": str(tiny_model_path), "critic": critic},
                              algo={"kl_coef": 0.05, "entropy_coef": 0.01, "epochs": 2},
                              train={"prompts_per_step": 12, "micro_batch_size": 3, "max_grad_norm": 1e9, "lr": 1e-2})
    check_logprobs_phase(trainer, step)
    check_update(trainer, step, lambda mask: float(mask.sum()))


# micro-batch statistics that are not token means (a max, a variance ratio) legitimately depend on the cut
CUT_DEPENDENT = ("policy/ratio_max", "value/explained_variance")


@pytest.mark.parametrize("algorithm, sections", [
    ("grpo", {"algo": {"group_size": 4, "kl_coef": 0.05, "entropy_coef": 0.01}}),
    ("ppo", {"algo": {"kl_coef": 0.05, "epochs": 2}, "train": {"mini_batch_size": 4}}),
])
def test_training_with_packing_and_budget_matches(algorithm, sections, tiny_model_path, arithmetic_data, tmp_path):
    """Three steps with packing + a token budget and without: the same metrics and weights (float32)."""
    runs = []
    for pack_on, budget in ((False, 0), (True, 30)):
        train = {"steps": 3, "prompts_per_step": 4, "micro_batch_size": 3, "lr": 1e-2,
                 "pack_sequences": pack_on, "max_tokens_per_micro_batch": budget} | sections.get("train", {})
        trainer = align.Trainer(tiny_run_config(algorithm, tiny_model_path, arithmetic_data["prompts"],
                                                tmp_path / f"run{int(pack_on)}", distinct_chars,
                                                {"rollout": {"max_new_tokens": 8}}, algo=sections["algo"], train=train))
        result = trainer.train()
        runs.append((result.history, {k: v.detach().clone() for k, v in trainer.models.policy.named_parameters()}))
    (h0, w0), (h1, w1) = runs
    assert len(h0) == len(h1) == 3
    for r0, r1 in zip(h0, h1):
        keys = [k for k, v in r0.items() if isinstance(v, float) and not k.startswith("time/")
                and not k.endswith("_per_s") and k not in CUT_DEPENDENT]
        assert "loss/policy" in keys and "train/grad_norm" in keys
        for k in keys:
            assert r1[k] == pytest.approx(r0[k], rel=1e-4, abs=1e-5), k
    for name, w in w0.items():
        # Adam's first steps turn rounding noise in ~0 gradients into up to ~lr * 1e-3 (see test_rl_math_end_to_end)
        torch.testing.assert_close(w1[name], w, rtol=0, atol=1e-4, msg=name)
