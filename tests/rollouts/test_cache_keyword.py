"""The engine passes its KV cache by the keyword the model's forward takes: `cache` (transformers >= 5.24) or
`past_key_values` (older 5.x, e.g. the GPU images' 5.17), so neither release warns nor breaks."""
from __future__ import annotations

import logging
import warnings

import packaging.version
import peft
import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.errors import ConfigError
from align.rollouts import RolloutEngine, SamplingParams
from align.rollouts.hf_cache import cache_keyword

PROMPTS = ["1+2=", "33+44=", "hello"]
GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
NEW_NAME = packaging.version.parse(transformers.__version__) >= packaging.version.parse("5.24.0")


class OldSignature(nn.Module):
    """A causal LM as transformers < 5.24 declares it: the forward takes `past_key_values` only (no `cache`,
    no **kwargs, so passing `cache=` is a TypeError). Runs the real tiny model underneath."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config
        self.calls = 0

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, logits_to_keep=0):
        self.calls += 1
        kw = {"cache" if NEW_NAME else "past_key_values": past_key_values}
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache, logits_to_keep=logits_to_keep, **kw)


@pytest.fixture(scope="module")
def llama(tiny_model_path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_path).eval(), AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def qwen(tiny_qwen_path):
    return AutoModelForCausalLM.from_pretrained(tiny_qwen_path).eval(), AutoTokenizer.from_pretrained(tiny_qwen_path)


def _generate_recording(model, tok, **engine_kw):
    """Generate while recording every Python warning and every transformers log record."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler, hf_logger = Keep(), logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    logging.Logger.warning_once.cache_clear()  # transformers' warn-once memo: an earlier test may have used it
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batch = RolloutEngine(model, tok, **engine_kw).generate(PROMPTS, GREEDY)
    finally:
        hf_logger.removeHandler(handler)
    texts = [str(w.message) for w in caught] + [r.getMessage() for r in records]
    return batch, [t for t in texts if "past_key_values" in t or "cache_params" in t]


@pytest.mark.parametrize("arch", ["llama", "qwen"])
@pytest.mark.parametrize("static", [False, True])
def test_generation_emits_no_cache_deprecation(arch, static, request):
    model, tok = request.getfixturevalue(arch)
    batch, deprecations = _generate_recording(model, tok, static_cache=static)
    assert deprecations == []
    assert batch.mask.sum() == len(PROMPTS) * GREEDY.max_new_tokens  # it did decode (ignore_eos)


def test_graph_style_step_emits_no_cache_deprecation(llama):
    """The device-counter step that CUDA graphs capture, run eagerly here: the same forward call."""
    model, tok = llama
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = RolloutEngine(model, tok, static_cache=True)
        engine._tensor_steps = True
        engine.generate(PROMPTS, GREEDY)
    records = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert records == []


def test_real_model_takes_the_new_name_when_transformers_has_it(llama, qwen):
    expected = "cache" if NEW_NAME else "past_key_values"
    assert cache_keyword(llama[0]) == expected and cache_keyword(qwen[0]) == expected


def test_old_signature_gets_past_key_values_and_the_same_tokens(llama):
    """The floor (transformers 5.x before the rename), simulated: a forward that knows only `past_key_values`
    must be called with it, and greedy decoding must give exactly the real model's tokens."""
    model, tok = llama
    old = OldSignature(model).eval()
    assert cache_keyword(old) == "past_key_values"
    for static in (False, True):
        got = RolloutEngine(old, tok, static_cache=static).generate(PROMPTS, GREEDY)
        ref = RolloutEngine(model, tok, static_cache=static).generate(PROMPTS, GREEDY)
        assert torch.equal(got.response_ids, ref.response_ids)
        assert torch.allclose(got.logprobs, ref.logprobs, atol=1e-6)
    assert old.calls == 2 * GREEDY.max_new_tokens  # one prefill + 5 decode steps per call, 2 calls


def test_peft_wrapper_is_seen_through(llama):
    model, tok = llama
    lora = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model.name_or_path),
                               peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert cache_keyword(lora) == cache_keyword(model)
    _, deprecations = _generate_recording(lora.eval(), tok)
    assert deprecations == []


def test_forward_without_a_cache_argument_is_one_clear_error():
    class NoCache(nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    with pytest.raises(ConfigError, match="NoCache.forward takes neither `cache` nor `past_key_values`"):
        cache_keyword(NoCache())


def test_installed_transformers_is_in_the_declared_range():
    """The suite runs against what pyproject promises: its floor is a release we test (here or on the GPU image)."""
    import re
    from pathlib import Path

    from packaging.specifiers import SpecifierSet

    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    (pin,) = re.findall(r'^\s*"transformers([<>=!~][^"]*)",', text, flags=re.M)  # tomllib is 3.11+
    spec = SpecifierSet(pin)
    assert transformers.__version__ in spec
    floor = packaging.version.parse(next(s.version for s in spec if s.operator == ">="))
    assert floor <= packaging.version.parse("5.17")  # the GPU image's release must stay inside the range
