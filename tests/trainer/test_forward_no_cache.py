"""F17 (GPU readiness review): the trainer's teacher-forced forwards build no KV cache.

A model's config says `use_cache: True` (what generation wants); without `use_cache=False` every trainer and
no-grad forward would also build a DynamicCache holding every layer's K/V, an extra copy the trainer never reads.
"""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from align.models import decoder_and_head
from align.trainer.forward import response_forward


def _caches_seen(model, **kw) -> list:
    decoder, _ = decoder_and_head(model)
    seen = []
    handle = decoder.register_forward_hook(lambda mod, args, out: seen.append(out.past_key_values))
    try:
        ids = torch.randint(3, model.config.vocab_size, (2, 7))
        att = torch.ones_like(ids)
        att[0, :2] = 0  # a left-padded prompt
        response_forward(model, ids, att, 3, **kw)
    finally:
        handle.remove()
    return seen


def test_trainer_forward_builds_no_kv_cache(tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert model.config.use_cache  # the default the forward must override
    assert _caches_seen(model.train(), with_entropy=True) == [None]
    with torch.no_grad():
        assert _caches_seen(model.eval(), return_hidden=True) == [None]


def test_trainer_forward_emits_no_cache_deprecation(tiny_qwen_path):
    """F11's trainer side: with no cache at all the forwards take neither `cache` nor `past_key_values`."""
    import warnings

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _caches_seen(model.train(), with_entropy=True)
    assert [str(w.message) for w in caught if "past_key_values" in str(w.message) or "cache" in str(w.message)] == []
