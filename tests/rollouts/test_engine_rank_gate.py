"""F3 (GPU readiness review), the engine's side: the sampler is asked for the rank only up to `gate_top_k`
(curiosity's top-k; the trainer passes 0 without curiosity), and `topk_hit` keeps its meaning."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from align import kernels
from align.algos.positions import position_ids_from_mask
from align.rollouts import RolloutEngine, SamplingParams

PROMPTS = ["1+2=", "33+44=", "hello", "7*8="]
PARAMS = SamplingParams(max_new_tokens=5, temperature=1.0, ignore_eos=True, seed=3)


@pytest.fixture(scope="module")
def llama(tiny_model_path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_path).eval(), AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.mark.parametrize("backend", ["auto", "torch"])  # CPU auto: the ScalarSampler; torch: kernels.sample
def test_topk_hit_follows_gate_and_tokens_do_not_depend_on_it(llama, backend, monkeypatch):
    model, tok = llama
    caps = []
    real = kernels.sample

    def spy(*args, **kw):
        caps.append(kw.get("rank_cap"))
        return real(*args, **kw)

    monkeypatch.setattr(kernels, "sample", spy)
    vocab = model.config.vocab_size
    runs = {}
    for gate in (0, 1, vocab):
        caps.clear()
        runs[gate] = RolloutEngine(model, tok, sampler_backend=backend, gate_top_k=gate,
                                   counter_noise=True).generate(PROMPTS, PARAMS)
        if backend == "torch":
            assert caps and set(caps) == {gate}
        else:
            assert caps == []
    for gate in (1, vocab):
        assert torch.equal(runs[gate].response_ids, runs[0].response_ids)
        assert torch.equal(runs[gate].logprobs, runs[0].logprobs)
    live = runs[0].mask.bool()
    assert not runs[0].topk_hit.any()  # top-0: nothing is a hit, and no rank was computed
    assert torch.equal(runs[vocab].topk_hit, live)  # every token is within the top-V
    # top-1 hit <=> the token was the argmax of its row: recompute the logits teacher-forced
    b = runs[1]
    with torch.no_grad():
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                       position_ids=position_ids_from_mask(b.attention_mask)).logits
    t = b.response_ids.shape[1]
    step_logits = logits[:, -t - 1:-1]
    is_max = b.response_ids == step_logits.argmax(-1)
    assert torch.equal(b.topk_hit, is_max & live)


def test_gate_top_k_validation(llama):
    model, tok = llama
    with pytest.raises(ValueError, match="gate_top_k=-1 must be an integer >= 0"):
        RolloutEngine(model, tok, gate_top_k=-1)
