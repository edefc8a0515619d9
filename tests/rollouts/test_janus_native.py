"""Hugging Face's native Janus format through align.train (model.kind: umm) and classifier-free guidance."""
from __future__ import annotations

import json

import pytest
import torch

from align.testing import JANUS_IMAGE_TOKENS, make_tiny_janus

V, CODES, K = 20, 32, 4  # the tiny Janus: 17 words + 3 image tokens; a 32-code VQ codebook; 4 tokens per image


@pytest.fixture(scope="module")
def janus_dir(tmp_path_factory):
    return make_tiny_janus(tmp_path_factory.mktemp("janus-native"), seed=0)


@pytest.fixture(scope="module")
def image_lm(janus_dir):
    from align.rollouts.janus import load_janus_image_lm

    return load_janus_image_lm(janus_dir, torch.float32, torch.device("cpu")).eval()


def test_the_sampling_spec_of_a_native_janus_directory_comes_from_its_config(janus_dir):
    from transformers import AutoTokenizer

    from align.rollouts.umm import umm_generation_spec

    assert json.loads((janus_dir / "config.json").read_text())["model_type"] == "janus"
    assert "umm" not in json.loads((janus_dir / "config.json").read_text())
    spec = umm_generation_spec(janus_dir)
    tok = AutoTokenizer.from_pretrained(janus_dir)
    assert len(tok) == V
    assert spec["num_image_tokens"] == spec["min_new_tokens"] == spec["max_new_tokens"] == K
    assert spec["allowed_token_ids"] == list(range(V, V + CODES))  # VQ code c is id V + c
    assert spec["prompt_suffix"] == JANUS_IMAGE_TOKENS[1] and spec["stop_token_ids"] == []


def test_cfg_combination_against_hand_computed_values():
    from align.rollouts.janus import cfg_combine

    cond, uncond = torch.tensor([1.0, 3.0, -2.0]), torch.tensor([0.0, 1.0, 2.0])
    # uncond + s (cond - uncond) with s = 2: [0 + 2*1, 1 + 2*2, 2 + 2*(-4)]
    assert torch.equal(cfg_combine(cond, uncond, 2.0), torch.tensor([2.0, 5.0, -6.0]))
    assert torch.equal(cfg_combine(cond, uncond, 1.0), cond)


def _janus_scores(janus, ids: list[int], image: list[int]) -> torch.Tensor:
    """Reference: Janus' own parts, unpadded: generation-head logits [1 + len(image), CODES] after the prompt."""
    emb = janus.get_input_embeddings()(torch.tensor([ids]))
    if image:
        emb = torch.cat([emb, janus.prepare_embeddings_for_image_generation(torch.tensor([image]))], dim=1)
    with torch.no_grad():
        hidden = janus.model.language_model(inputs_embeds=emb).last_hidden_state
        return janus.model.generation_head(hidden[0, len(ids) - 1:])


def test_image_lm_logits_are_janus_generation_head_and_guidance_follows_janus_recipe(image_lm):
    from transformers import DynamicCache, StaticCache

    from align.rollouts.janus import TEXT_LOGIT

    tok, janus = image_lm.tokenizer, image_lm.janus
    boi = tok.convert_tokens_to_ids(JANUS_IMAGE_TOKENS[1])
    prompt = [2] + tok("a red circle", add_special_tokens=False)["input_ids"] + [boi]  # BOS text boi
    image = [5, 17]
    cond = _janus_scores(janus, prompt, image)
    # Janus' unconditional prompt keeps BOS and boi and pads the rest (modeling_janus.generate)
    uncond = _janus_scores(janus, [2] + [0] * (len(prompt) - 2) + [boi], image)
    static = StaticCache(config=image_lm.config, max_cache_len=16)
    # dynamic caches, then one static cache used twice (the engine resets and reuses its state; so must CFG)
    for s, cache in ((1.0, DynamicCache(config=image_lm.config)), (3.0, DynamicCache(config=image_lm.config)),
                     (3.0, static), (3.0, static)):
        image_lm.set_guidance_scale(s)
        cache.reset()
        steps = [image_lm(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]]
        for t in image:  # decode steps feed the sampled image token (as the offset id V + code)
            steps.append(image_lm(input_ids=torch.tensor([[V + t]]), cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1])
        got = torch.stack(steps)  # [3, V + CODES]
        assert torch.all(got[:, :V] == TEXT_LOGIT)  # text ids can never be sampled at an image position
        want = uncond + s * (cond - uncond)
        assert torch.allclose(got[:, V:], want, atol=1e-5)
    assert not torch.allclose(cond, uncond, atol=1e-3)  # the guided case differs from the unguided one
    image_lm.set_guidance_scale(1.0)
    # The trainer's path (decoder + head, no cache) is never guided; its log-softmax over all ids is Janus' codebook one.
    from align.trainer.forward import response_forward

    ids = torch.tensor([prompt + [V + t for t in image] + [V + 9]])
    image_lm.set_guidance_scale(3.0)
    with torch.no_grad():
        lp = response_forward(image_lm, ids, torch.ones_like(ids), 3).logprobs[0]
    image_lm.set_guidance_scale(1.0)
    ref = torch.log_softmax(cond.double(), -1)[torch.arange(3), torch.tensor(image + [9])]
    assert torch.allclose(lp.double(), ref, atol=1e-5)


def test_align_train_runs_grpo_on_a_native_janus_directory_with_guidance(janus_dir, tmp_path):
    import align

    data = tmp_path / "prompts.jsonl"
    with open(data, "w") as f:
        for cap in ["a red circle", "a cat on the mat"]:
            f.write(json.dumps({"prompt": f"{cap} {JANUS_IMAGE_TOKENS[1]}", "caption": cap}) + "\n")
    cfg = {
        "algorithm": "grpo",
        "model": {"path": str(janus_dir), "kind": "umm",
                  "lora": {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        "data": {"path": str(data)},
        "reward": {"functions": [{"name": "align.rewards.understanding:UnderstandingReward", "kwargs": {"scorer": "policy"}}]},
        "rollout": {"temperature": 1.0, "guidance_scale": 2.0},
        "algo": {"group_size": 4, "kl_coef": 0.03, "kl_estimator": "k3"},
        "train": {"steps": 2, "prompts_per_step": 2, "micro_batch_size": 8, "lr": 5e-2, "seed": 0, "device": "cpu"},
        "logging": {"run_dir": str(tmp_path / "run"), "progress": False, "print_every": 0},
        "checkpoint": {"save_final": False},
    }
    trainer = align.Trainer(cfg)
    assert trainer.models.policy.guidance_scale == 2.0
    step, _ = trainer.phase_generate()
    ids = step.batch.response_ids
    assert ids.shape == (8, K) and bool(step.batch.mask.all())
    assert int(ids.min()) >= V and int(ids.max()) < V + CODES
    trainer.phase_score(step)
    assert bool(step.valid.all()) and bool(((step.scores > 0) & (step.scores <= 1)).all())
    # The reward reads the image through Janus' vision encoder: exp(mean log p(caption | image)) from JanusUMM
    from align.rollouts.umm import JanusUMM

    janus, tok = trainer.models.policy.get_base_model().janus, trainer.tokenizer
    umm = JanusUMM(janus, tok, boi_token_id=tok.convert_tokens_to_ids(JANUS_IMAGE_TOKENS[1]),
                   eoi_token_id=tok.convert_tokens_to_ids(JANUS_IMAGE_TOKENS[2]))
    captions = [c for c in ["a red circle", "a cat on the mat"] for _ in range(4)]
    with torch.no_grad():
        ref = [float(torch.exp(lp.double().mean())) for lp in umm.score_text(ids - V, captions)]
    assert torch.allclose(step.scores.double().cpu(), torch.tensor(ref, dtype=torch.float64), atol=1e-5)
    lora_before = {n: p.detach().clone() for n, p in trainer.models.policy.named_parameters() if p.requires_grad}
    result = trainer.train()
    assert len(result.history) == 2
    for h in result.history:
        assert h["rollout/response_length"] == K and h["reward/errors"] == 0
        assert 0.0 < h["reward/mean"] <= 1.0 and torch.isfinite(torch.tensor(h["loss/policy"]))
    changed = [n for n, p in trainer.models.policy.named_parameters() if p.requires_grad and not torch.equal(p, lora_before[n])]
    assert changed and all("lora" in n for n in changed)


def test_guidance_scale_key_is_checked_at_start_up(toy_umm_path, tmp_path):
    import align
    from align.config import config_from_dict
    from align.errors import ConfigError, UserError

    base = {"algorithm": "grpo", "model": {"path": str(toy_umm_path)}, "data": {"path": str(tmp_path / "d.jsonl")},
            "reward": {"functions": ["align.rewards.understanding:UnderstandingReward"]}}
    with pytest.raises(ConfigError, match="guidance_scale"):
        config_from_dict({**base, "rollout": {"guidance_scale": 2.0}})  # a text model
    with pytest.raises(ConfigError, match="guidance_scale"):
        config_from_dict({**base, "model": {"path": str(toy_umm_path), "kind": "umm"}, "rollout": {"guidance_scale": 0.0}})
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "a circle <boi>", "caption": "a circle"}) + "\n")
    cfg = {**base, "model": {"path": str(toy_umm_path), "kind": "umm"}, "rollout": {"guidance_scale": 2.0},
           "logging": {"run_dir": str(tmp_path / "run"), "progress": False}}
    with pytest.raises(UserError, match="native Janus"):  # the toy causal-LM UMM has no guided forward
        align.Trainer(cfg)
