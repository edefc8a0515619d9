"""UMM adapters: the toy causal-LM UMM and transformers' Janus generate image tokens and score text."""
from __future__ import annotations

import pytest
import torch

from align.rollouts.umm import JanusUMM, umm_generation_spec

PROMPTS = ["a circle <boi>", "a red square left of a blue triangle <boi>"]


def causal_reference_logprobs(model, rows, start):
    """Per-row unpadded float64 log p(row[t] | row[:t]) for t >= start."""
    out = []
    for row in rows:
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([row])).logits[0].double(), -1)
        out.append(torch.tensor([logp[t - 1, row[t]].item() for t in range(start(row), len(row))], dtype=torch.float64))
    return out


def test_generation_spec_from_the_saved_model(toy_umm_path):
    spec = umm_generation_spec(toy_umm_path)
    assert spec["num_image_tokens"] == spec["min_new_tokens"] == spec["max_new_tokens"] == 9
    assert spec["stop_token_ids"] == [] and spec["prompt_suffix"] == " <boi>" and len(spec["allowed_token_ids"]) == 10
    with pytest.raises(ValueError, match="no `umm` section"):
        from transformers import LlamaConfig

        umm_generation_spec(LlamaConfig())


def test_toy_umm_generates_exactly_k_image_tokens_with_consistent_logprobs(toy_umm):
    out = toy_umm.generate_image_tokens(PROMPTS, num_samples=3, temperature=1.0, min_p=0.03, seed=7)
    assert out.ids.shape == (6, 9) and out.logprobs.shape == (6, 9)
    assert set(out.ids.flatten().tolist()) <= set(toy_umm.image_token_ids)
    again = toy_umm.generate_image_tokens(PROMPTS, num_samples=3, temperature=1.0, min_p=0.03, seed=7)
    assert torch.equal(again.ids, out.ids)  # seeded
    tok = toy_umm.tokenizer
    prompt_rows = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS for _ in range(3)]
    rows = [p + img for p, img in zip(prompt_rows, out.ids.tolist())]
    ref = causal_reference_logprobs(toy_umm.model, rows, lambda row: len(row) - 9)
    # Rollout log-probs are of the raw (temperature-1, unfiltered) policy, as the trainer recomputes them.
    assert torch.allclose(out.logprobs.double(), torch.stack(ref), atol=2e-5)
    assert torch.allclose(toy_umm.image_logprobs([p for p in PROMPTS for _ in range(3)], out.ids).double(), torch.stack(ref), atol=2e-5)


def test_toy_umm_top_k_1_is_greedy_over_image_tokens_and_cfg_changes_the_draw(toy_umm):
    out = toy_umm.generate_image_tokens(PROMPTS[:1], top_k=1, seed=0)
    tok = toy_umm.tokenizer
    row = tok(PROMPTS[0], add_special_tokens=False)["input_ids"]
    allowed = torch.tensor(toy_umm.image_token_ids)
    for k, t in enumerate(out.ids[0].tolist()):
        with torch.no_grad():
            logits = toy_umm.model(input_ids=torch.tensor([row])).logits[0, -1]
        assert t == allowed[logits[allowed].argmax()].item()
        row.append(t)
    guided = toy_umm.generate_image_tokens(PROMPTS, num_samples=4, cfg_scale=3.0, seed=3)
    assert guided.ids.shape == (8, 9) and set(guided.ids.flatten().tolist()) <= set(toy_umm.image_token_ids)


def test_toy_umm_score_text_matches_float64(toy_umm):
    out = toy_umm.generate_image_tokens(PROMPTS, seed=1)
    texts = ["a circle", "a red square left of a blue triangle"]
    got = toy_umm.score_text(out.ids, texts)
    rows, starts = toy_umm.understanding_rows(out.ids, texts)
    ref = causal_reference_logprobs(toy_umm.model, rows, lambda row: starts[rows.index(row)])
    for g, r, t in zip(got, ref, texts):
        assert len(g) == len(t.split()) and torch.allclose(g.double(), r, atol=2e-5)


def test_janus_adapter_generates_image_tokens_and_scores_text(tiny_janus):
    model, tok, ids = tiny_janus
    umm = JanusUMM(model, tok, boi_token_id=ids["<boi>"], eoi_token_id=ids["<eoi>"])
    assert umm.num_image_tokens == 4
    prompts = ["a red circle", "a cat on the mat"]
    for cfg in (None, 2.0):
        out = umm.generate_image_tokens(prompts, num_samples=2, min_p=0.03, cfg_scale=cfg, seed=0)
        assert out.ids.shape == (4, 4) and out.logprobs.shape == (4, 4)
        assert 0 <= int(out.ids.min()) and int(out.ids.max()) < model.config.vq_config.num_embeddings
    # Rollout log-probs = an independent unpadded float64 teacher-forced pass through the generation head.
    m64 = type(model).from_pretrained(model.name_or_path, dtype=torch.float64).eval()

    def reference(prompt, image):  # [K, V] float64 log-probs of each image position
        row = tok(prompt, add_special_tokens=False)["input_ids"] + [ids["<boi>"]]
        emb = torch.cat([m64.get_input_embeddings()(torch.tensor([row])),
                         m64.prepare_embeddings_for_image_generation(image.view(1, -1))], dim=1)
        with torch.no_grad():
            hidden = m64.model.language_model(inputs_embeds=emb).last_hidden_state
            return torch.log_softmax(m64.model.generation_head(hidden[0, len(row) - 1:len(row) + 3]), -1)

    for i, p in enumerate(p for p in prompts for _ in range(2)):
        ref = reference(p, out.ids[i]).gather(-1, out.ids[i].unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(out.logprobs[i].double(), ref, atol=1e-5)
    # Greedy (top_k = 1, no CFG) picks the argmax of the same teacher-forced distribution at every step.
    greedy = umm.generate_image_tokens(prompts[1:], top_k=1, seed=0)
    assert torch.equal(greedy.ids[0], reference(prompts[1], greedy.ids[0]).argmax(-1))

    texts = ["a red circle", "a cat on the mat", "a dog", "describe the image"]
    scores = umm.score_text(out.ids, texts)
    assert [len(s) for s in scores] == [3, 5, 2, 3] and all(torch.all(s <= 0) for s in scores)
    # Independent reference: VQ-decode, resize, and one unpadded float64 pass per text.
    head = [ids["<boi>"]] + [model.config.image_token_id] * 4 + [ids["<eoi>"]] + tok(umm.instruction, add_special_tokens=False)["input_ids"]
    pixels = torch.nn.functional.interpolate(m64.decode_image_tokens(out.ids).permute(0, 3, 1, 2), size=(16, 16),
                                             mode="bilinear", align_corners=False).clamp(-1, 1)
    for i, t in enumerate(texts):
        text = tok(t, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = m64(input_ids=torch.tensor([head + text]), pixel_values=pixels[i:i + 1]).logits[0]
        lp = torch.log_softmax(logits, -1)
        ref = torch.tensor([lp[len(head) + j - 1, text[j]].item() for j in range(len(text))], dtype=torch.float64)
        assert torch.allclose(scores[i].double(), ref, atol=1e-5)
    # The text score depends on the image: the understanding branch reads it.
    other = umm.score_text(torch.flip(out.ids, dims=[0]), texts)
    assert any(not torch.allclose(a, b) for a, b in zip(scores, other))
