"""Architectures that change lm_head(h) before the softmax (GPU_READINESS F15 and a Granite finding).

The trainer's log-probs come from the hidden states and the lm_head (fused, chunked); the rollout engine samples
from the model's own logits. Cohere scales them, Granite divides them by `logits_scaling` (which the trainer
ignored: its log-probs were off by up to 0.17 nats on a tiny model), Gemma-2 soft-caps them (which sent the
trainer to full [N, T, V] logits). Each is checked here against float64 log-softmax of the model's own logits,
loaded the way users load models (`save_pretrained`, then `align.models.load_causal_lm`)."""
from __future__ import annotations

import pytest
import torch
from transformers import CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig, LlamaForCausalLM

import align.trainer.forward as fw
from align.config import ModelConfig
from align.models import check_head_path, load_causal_lm, needs_full_logits
from align.trainer.forward import response_forward

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
CONFIGS = {
    "granite": GraniteConfig(**SMALL, logits_scaling=8.0),
    "cohere": CohereConfig(**SMALL, logit_scale=0.25),
    "gemma2": Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=1.5),
}


def reference_logprobs(model, ids, att, response_len, temperature):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att, position_ids=(att.cumsum(-1) - 1).clamp(min=0)).logits
    z = logits.double()[:, -response_len - 1:-1] / temperature
    logp = torch.log_softmax(z, -1)
    lp = logp.gather(-1, ids[:, -response_len:, None])[..., 0]
    return lp, -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("small_logits", [1 << 22, 0])  # one matmul, and the fused chunked path
def test_logprobs_match_the_models_own_logits(arch, small_logits, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(CONFIGS[arch]).save_pretrained(tmp_path / arch)
    model = load_causal_lm(tmp_path / arch, ModelConfig(path=str(tmp_path / arch)), torch.device("cpu")).eval()
    assert not needs_full_logits(model)  # the fused lm_head path, never [N, T, V] logits
    monkeypatch.setattr(fw, "SMALL_LOGITS", small_logits)
    ids = torch.randint(3, 97, (3, 12))
    att = torch.ones_like(ids)
    att[0, :3] = 0  # a left-padded prompt
    out = response_forward(model, ids, att, 5, with_entropy=True, temperature=0.7)
    lp, ent = reference_logprobs(model, ids, att, 5, 0.7)
    torch.testing.assert_close(out.logprobs.double(), lp, rtol=0, atol=2e-5)
    torch.testing.assert_close(out.entropy.double(), ent, rtol=0, atol=2e-5)


class _TripledLogits(LlamaForCausalLM):
    """An architecture whose forward changes its logits in a way no config key announces."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out


def test_an_unknown_logit_change_falls_back_to_the_full_logits():
    torch.manual_seed(1)
    model = _TripledLogits(LlamaConfig(**SMALL)).eval()
    assert not needs_full_logits(model)  # unchecked: assumed plain lm_head(h)
    with pytest.warns(UserWarning, match=r"full \[N, T, V\] logits"):
        assert check_head_path(model) is False
    assert needs_full_logits(model)
    ids = torch.randint(3, 97, (2, 9))
    att = torch.ones_like(ids)
    out = response_forward(model, ids, att, 4)
    lp, _ = reference_logprobs(model, ids, att, 4, 1.0)
    torch.testing.assert_close(out.logprobs.double(), lp, rtol=0, atol=2e-5)
