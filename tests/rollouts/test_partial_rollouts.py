"""Partial rollouts (rollouts/partial.py): an interrupted response's tokens, log-probs and versions against a
brute-force reference that decodes token by token with full forwards (no KV cache) under each segment's
weights, drawing the Gumbel noise of the documented keys (sample id + segment * SEGMENT_STRIDE)."""
from __future__ import annotations

import math

import pytest
import torch

from align.rollouts.engine import RolloutEngine
from align.rollouts.noise import sample_keys, uniform_noise
from align.rollouts.params import SamplingParams
from align.rollouts.partial import SEGMENT_STRIDE, generate_partial
from align.testing import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_model(tmp_path_factory.mktemp("partial") / "m", hidden_size=32, num_layers=2, num_heads=2, seed=3)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").float().eval()
    tok = AutoTokenizer.from_pretrained(path)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    # three weight versions: v0 = the checkpoint, v1, v2 = perturbed copies (what a trainer update would do)
    versions = [base] + [{k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(s))
                          if v.is_floating_point() else v for k, v in base.items()} for s in (1, 2)]
    return model, tok, versions


def reference(model, versions, prompt, seed, sample_id, plan):
    """plan: [(version, n_tokens)] per segment; full-sequence forward per token, Gumbel-max at temperature 1."""
    seq, toks, lps, vers = list(prompt), [], [], []
    for segment, (v, count) in enumerate(plan):
        model.load_state_dict(versions[v])
        key = sample_keys(seed, torch.tensor([sample_id + segment * SEGMENT_STRIDE]))
        for t in range(count):
            with torch.no_grad():
                logits = model(torch.tensor([seq])).logits[0, -1].float()
            lp = torch.log_softmax(logits, -1)
            u = uniform_noise(key, t, lp.numel())[0]
            tok = int(torch.argmax(lp - torch.log(-torch.log(u))))
            seq.append(tok)
            toks.append(tok)
            lps.append(float(lp[tok]))
            vers.append(v)
    return toks, lps, vers


def test_interrupted_response_follows_the_segment_rule(tiny):
    model, tok, versions = tiny
    engine = RolloutEngine(model, tok, micro_batch_size=4, counter_noise=True)
    prompts = [tok("12+3=", add_special_tokens=False).input_ids, tok("7=", add_special_tokens=False).input_ids]
    params = SamplingParams(max_new_tokens=10, temperature=1.0, ignore_eos=True, seed=11)
    model.load_state_dict(versions[0])
    current = [0]

    def next_version():  # a weight update lands between every two segments
        current[0] += 1
        model.load_state_dict(versions[current[0]])
        return current[0]

    batch = generate_partial(engine, prompts, params, chunk=4, version=0, next_version=next_version,
                             sample_ids=torch.tensor([5, 9]))
    assert current[0] == 2  # segments of 4, 4 and 2 tokens
    for row, (prompt, sid) in enumerate(zip(prompts, [5, 9])):
        toks, lps, vers = reference(model, versions, prompt, 11, sid, [(0, 4), (1, 4), (2, 2)])
        keep = batch.mask[row].bool()
        assert batch.response_ids[row][keep].tolist() == toks
        assert torch.allclose(batch.logprobs[row][keep], torch.tensor(lps), atol=1e-4)
        assert batch.token_versions[row][keep].tolist() == vers
        assert int(batch.versions[row]) == 0  # a sample's version is its oldest token's
        assert batch.prompt_ids[row][batch.prompt_mask[row].bool()].tolist() == prompt
    assert batch.stop_reasons == ["length", "length"]


def test_no_weight_change_reproduces_the_reference_and_finished_rows_stop(tiny):
    """Rows that end (EOS) in the first segment are not continued; the others continue under the same weights
    (KV recomputed from prompt + prefix) and still match the token-by-token reference."""
    model, tok, versions = tiny
    model.load_state_dict(versions[1])
    engine = RolloutEngine(model, tok, micro_batch_size=8, counter_noise=True)
    eos = tok.eos_token_id
    prompts = [tok(p, add_special_tokens=False).input_ids for p in ["1+1=", "23+4=", "5=", "9+9="]]
    params = SamplingParams(max_new_tokens=7, temperature=1.0, stop_token_ids=[], seed=4)
    calls = []
    batch = generate_partial(engine, prompts, params, chunk=3, version=1,
                             next_version=lambda: calls.append(1) or 1, sample_ids=torch.arange(4))
    needed = []
    for row, prompt in enumerate(prompts):
        toks, lps, _ = reference(model, versions, prompt, 4, row, [(1, 3), (1, 3), (1, 1)])
        if eos in toks:  # the reference stops at EOS, the EOS token included
            toks, lps = toks[:toks.index(eos) + 1], lps[:toks.index(eos) + 1]
        keep = batch.mask[row].bool()
        assert batch.response_ids[row][keep].tolist() == toks
        assert torch.allclose(batch.logprobs[row][keep], torch.tensor(lps), atol=1e-4)
        assert batch.stop_reasons[row] == ("eos" if toks[-1] == eos else "length")
        needed.append(math.ceil(len(toks) / 3))
    assert len(calls) == max(needed) - 1  # a boundary only while some row is unfinished
