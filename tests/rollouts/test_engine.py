"""The rollout engine against Hugging Face generate and the trainer's recomputed log-probs."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.rollouts import RolloutEngine, SamplingParams
from align.trainer.forward import response_forward

PROMPTS = ["1+2=", "33+44=", "7", "hello world, "]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_and_tok(request, tiny_model_path, tiny_qwen_path):
    path = tiny_model_path if request.param == "llama" else tiny_qwen_path
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_greedy_matches_transformers_generate(model_and_tok):
    model, tok = model_and_tok
    engine = RolloutEngine(model, tok, micro_batch_size=4)
    batch = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True))
    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    ref = model.generate(**enc, max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=tok.pad_token_id)
    assert torch.equal(batch.response_ids, ref[:, enc.input_ids.shape[1]:])


def test_rollout_logprobs_match_trainer_recompute(model_and_tok):
    model, tok = model_and_tok
    engine = RolloutEngine(model, tok, micro_batch_size=2)  # bucketing: two micro-batches
    batch = engine.generate(PROMPTS * 2, SamplingParams(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9))
    with torch.no_grad():
        fwd = response_forward(model, batch.input_ids, batch.attention_mask, batch.response_ids.shape[1])
    m = batch.mask.bool()
    # Documented tolerance (fp32, CPU): 1e-4 absolute; padding differs between prefill and teacher forcing.
    assert (fwd.logprobs[m] - batch.logprobs[m]).abs().max() < 1e-4
    assert (batch.logprobs[m] <= 0).all() and (batch.sampling_logprobs[m] >= batch.logprobs[m] - 1e-5).all()


def test_sampling_is_invariant_to_batch_split(model_and_tok):
    """A sample's tokens depend on its id, not on its batch-mates (1 vs N rollout workers)."""
    model, tok = model_and_tok
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)
    prompts = PROMPTS * 2
    whole = RolloutEngine(model, tok, micro_batch_size=8).generate(prompts, params, sample_ids=torch.arange(8))
    engine = RolloutEngine(model, tok, micro_batch_size=3)
    left = engine.generate(prompts[:5], params, sample_ids=torch.arange(5))
    right = engine.generate(prompts[5:], params, sample_ids=torch.arange(5, 8))
    assert whole.completions == left.completions + right.completions


def test_stop_tokens_strings_and_lengths(model_and_tok):
    model, tok = model_and_tok
    engine = RolloutEngine(model, tok)
    greedy = engine.generate(["1+2="], SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True))
    first = greedy.response_ids[0, 0].item()
    stopped = engine.generate(["1+2="], SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_ids=[first]))
    assert stopped.mask.sum().item() == 1 and stopped.response_ids[0, 0].item() == first
    text = greedy.completions[0]
    stop = text[1:3] if len(text) >= 3 else text
    cut = engine.generate(["1+2="], SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True, stop=[stop]))
    assert cut.completions[0].endswith(stop) and len(cut.completions[0]) <= len(text)
    allowed = tok.convert_tokens_to_ids(list("0123456789"))
    digits = engine.generate(PROMPTS, SamplingParams(max_new_tokens=5, allowed_token_ids=allowed, min_new_tokens=5))
    assert digits.mask.sum(-1).tolist() == [5] * len(PROMPTS)
    assert all(c.isdigit() for c in digits.completions)


def test_top_k_one_equals_greedy(model_and_tok):
    model, tok = model_and_tok
    engine = RolloutEngine(model, tok)
    a = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True))
    b = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, temperature=1.0, top_k=1, ignore_eos=True))
    assert torch.equal(a.response_ids, b.response_ids)
    assert (b.sampling_logprobs[b.mask.bool()].abs() < 1e-6).all()  # top-1: probability 1 under truncation
    assert b.topk_hit[b.mask.bool()].all()


def test_trainer_logprobs_at_the_sampling_temperature(model_and_tok):
    """response_forward(temperature=T) = log_softmax(logits / T)[token], computed here in float64."""
    model, tok = model_and_tok
    batch = RolloutEngine(model, tok).generate(PROMPTS, SamplingParams(max_new_tokens=5, temperature=0.7))
    t = batch.response_ids.shape[1]
    with torch.no_grad():
        fwd = response_forward(model, batch.input_ids, batch.attention_mask, t, temperature=0.7, with_entropy=True)
        positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions).logits
    logp = torch.log_softmax(logits[:, -t - 1:-1].double() / 0.7, -1)
    expected = logp.gather(-1, batch.response_ids[..., None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    m = batch.mask.bool()
    torch.testing.assert_close(fwd.logprobs[m].double(), expected[m], rtol=0, atol=2e-5)
    torch.testing.assert_close(fwd.entropy[m].double(), entropy[m], rtol=0, atol=2e-5)
