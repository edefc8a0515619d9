"""GvU's UnderstandingReward against an independent float64 re-computation from the model's logits."""
from __future__ import annotations

import math
import random

import pytest
import torch
import toyworld as tw  # examples/toyworld.py (tests/conftest.py puts examples/ on sys.path)
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.rewards.understanding import UnderstandingReward

CAPTIONS = ["a circle", "two squares", "a red circle left of a blue triangle", "a green square and a red circle", "a triangle"]


def random_images(layout, n, seed=0):
    rng = random.Random(seed)
    return [[rng.choice(layout["image_token_ids"]) for _ in range(layout["num_image_tokens"])] for _ in range(n)]


def reference_scores(model, tok, images, captions):
    """exp(mean_j log p(T_j | <boi> I <eoi> instruction T_<j)), one unpadded float64 pass per sample."""
    layout = model.config.umm
    out = []
    for img, cap in zip(images, captions):
        head = [layout["boi_token_id"], *img, layout["eoi_token_id"]] + tok(layout["instruction"], add_special_tokens=False)["input_ids"]
        text = tok(cap, add_special_tokens=False)["input_ids"]
        seq = torch.tensor([head + text])
        with torch.no_grad():
            logits = model(input_ids=seq).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        token_lp = [logp[len(head) + j - 1, text[j]].item() for j in range(len(text))]
        out.append((math.exp(sum(token_lp) / len(token_lp)), token_lp))
    return out


def test_reward_equals_float64_recomputation_and_is_batch_invariant(toy_umm_path):
    model = AutoModelForCausalLM.from_pretrained(toy_umm_path).eval()
    tok = AutoTokenizer.from_pretrained(toy_umm_path)
    images = random_images(model.config.umm, len(CAPTIONS))
    prompts = [c + " <boi>" for c in CAPTIONS]
    ref = reference_scores(model, tok, images, CAPTIONS)
    for batch_size in (64, 2):
        reward = UnderstandingReward(model_path=str(toy_umm_path), batch_size=batch_size)
        out = reward.score(prompts, ["<img>"] * len(prompts), completion_ids=images)
        for i, (score, token_lp) in enumerate(ref):
            assert out.errors[i] is None
            assert out.scores[i] == pytest.approx(score, rel=1e-6, abs=1e-9)
            assert 0.0 < out.scores[i] <= 1.0
            assert out.info[i]["token_logprobs"] == pytest.approx(token_lp, abs=2e-6)
            assert out.info[i]["text"] == CAPTIONS[i]  # prompt suffix " <boi>" stripped
    # The TRL-style call returns the same scores; a `caption` column overrides the prompt text.
    assert reward(prompts, ["x"] * 5, completion_ids=images) == pytest.approx([s for s, _ in ref], rel=1e-6)
    swapped = reward(prompts, ["x"] * 5, completion_ids=images, caption=CAPTIONS[::-1])
    assert swapped == pytest.approx([s for s, _ in reference_scores(model, tok, images, CAPTIONS[::-1])], rel=1e-6)


def test_reward_reports_malformed_images_as_errors_and_needs_completion_ids(toy_umm_path):
    reward = UnderstandingReward(model_path=str(toy_umm_path))
    layout = reward.layout
    good = random_images(layout, 1)[0]
    text_token = reward.tokenizer.convert_tokens_to_ids("circle")
    out = reward.score(["a circle <boi>"] * 3, ["x"] * 3, completion_ids=[good, good[:-1], good[:-1] + [text_token]])
    assert out.scores[0] is not None and out.scores[1] is None and out.scores[2] is None
    assert "expected 9 image tokens" in out.errors[1] and out.errors[2] is not None
    with pytest.raises(ValueError, match="completion_ids"):
        reward.score(["a circle <boi>"], ["x"])


def test_policy_and_frozen_teacher_scorers_with_lora(toy_umm_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(toy_umm_path).eval()
    tok = AutoTokenizer.from_pretrained(toy_umm_path)
    images = random_images(base.config.umm, 3, seed=1)
    captions = CAPTIONS[:3]
    base_ref = [s for s, _ in reference_scores(base, tok, images, captions)]
    torch.manual_seed(0)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(toy_umm_path),
                            LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    policy.train()
    with policy.disable_adapter():
        assert [s for s, _ in reference_scores(policy, tok, images, captions)] == pytest.approx(base_ref, rel=1e-6)
    policy_ref = [s for s, _ in reference_scores(policy, tok, images, captions)]
    assert max(abs(a - b) for a, b in zip(policy_ref, base_ref)) > 1e-4  # the adapters change the scores

    teacher = UnderstandingReward(scorer="teacher")
    teacher.bind_policy(policy, tok, disable_adapters=policy.disable_adapter)
    own = UnderstandingReward()  # scorer="policy", the released code's choice
    own.bind_policy(policy, tok, disable_adapters=policy.disable_adapter)
    assert teacher(captions, ["x"] * 3, completion_ids=images) == pytest.approx(base_ref, rel=1e-6)
    assert own(captions, ["x"] * 3, completion_ids=images) == pytest.approx(policy_ref, rel=1e-6)
    assert policy.training  # scoring restores the caller's train/eval mode
    with pytest.raises(ValueError, match="disable_adapters"):
        UnderstandingReward(scorer="teacher").bind_policy(base, tok)


def test_mixing_with_another_reward(toy_umm_path):
    def half(prompts, completions, **kwargs):
        return [0.5 if "circle" in p else None for p in prompts]

    plain = UnderstandingReward(model_path=str(toy_umm_path))
    mixed = UnderstandingReward(model_path=str(toy_umm_path), understanding_weight=0.5, mix=[(half, 2.0)])
    images = random_images(plain.layout, 2, seed=2)
    prompts = ["a circle <boi>", "two squares <boi>"]
    r = plain(prompts, ["x", "x"], completion_ids=images)
    out = mixed.score(prompts, ["x", "x"], completion_ids=images)
    assert out.scores[0] == pytest.approx(0.5 * r[0] + 2.0 * 0.5, rel=1e-9)
    assert out.scores[1] is None and "gave no score" in out.errors[1]


def test_understanding_accuracy_harness_ranks_captions_by_the_reward(toy_umm_path):
    reward = UnderstandingReward(model_path=str(toy_umm_path))
    # A scorer that knows the truth (log p = 0 for true captions, -1 otherwise) must be perfect;
    # one that prefers false captions must score zero.
    layout = dict(reward.layout)

    def oracle(sign):
        def fn(images, texts):
            return [torch.tensor([0.0 if tw.holds(t, tw.image_values(img, layout), 3) == (sign > 0) else -1.0])
                    for img, t in zip(images, texts)]
        return fn

    assert tw.evaluate_understanding(oracle(+1), layout, n=24)["overall"] == 1.0
    assert tw.evaluate_understanding(oracle(-1), layout, n=24)["overall"] == 0.0
    acc = tw.evaluate_understanding(reward.text_logprobs, layout, n=12)
    assert 0.0 <= acc["overall"] <= 1.0
