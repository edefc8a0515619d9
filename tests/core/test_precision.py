"""F2 and F9 (GPU readiness review): which dtype each model holds and which autocast the trainer runs under,
for each device and `model.dtype`; the separate critic always trains fp32 masters; fp16 training is refused.

The resolution is a pure function of (dtype, lora, device): the table below is written out from the policy in
align/precision.py's docstring, not read back from the code. The autocast wiring is exercised on CPU by
marking a tiny model with bf16 (CPU autocast runs the same dispatch path as CUDA's).
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from align.backends.local import LocalBackend
from align.config import ModelConfig
from align.errors import ConfigError
from align.models import ValueHead, load_models
from align.precision import DecodeCopy, Precision, apply_matmul_precision, mark_autocast, resolve_precision
from align.trainer.forward import response_forward

F32, BF16 = torch.float32, torch.bfloat16
CPU, CUDA = torch.device("cpu"), torch.device("cuda")

# (dtype, lora, device) -> Precision(policy, reference, critic, autocast, decode, tf32)
TABLE = [
    ("auto", False, CUDA, Precision(F32, BF16, F32, BF16, BF16, True)),  # fp32 masters, bf16 compute/ref/decode
    ("auto", True, CUDA, Precision(BF16, BF16, F32, BF16, None, True)),  # frozen bf16 base, fp32 adapters
    ("auto", False, CPU, Precision(F32, F32, F32, None, None, False)),  # CPU: the exact fp32 reference
    ("auto", True, CPU, Precision(F32, F32, F32, None, None, False)),
    ("float32", False, CUDA, Precision(F32, F32, F32, None, None, False)),  # explicit fp32: IEEE, no autocast
    ("float32", True, CPU, Precision(F32, F32, F32, None, None, False)),
    ("bfloat16", True, CUDA, Precision(BF16, BF16, F32, BF16, None, True)),  # the critic keeps fp32 masters
    ("bfloat16", False, CPU, Precision(BF16, BF16, F32, None, None, False)),
]


@pytest.mark.parametrize("dtype,lora,device,expected", TABLE, ids=[f"{d}-lora{int(lo)}-{v.type}" for d, lo, v, _ in TABLE])
def test_precision_table(dtype, lora, device, expected):
    assert resolve_precision(dtype, lora, device) == expected


def test_auto_on_cpu_is_plain_fp32_and_decodes_the_policy(tiny_model_path):
    m = load_models(ModelConfig(path=str(tiny_model_path)), CPU, need_reference=True, critic="separate")
    assert m.decode is None and m.decode_model is m.policy
    assert {p.dtype for p in m.reference.parameters()} == {F32}


def test_trainer_forward_runs_under_the_marked_autocast(tiny_model_path):
    """Marked bf16: the decoder's linear layers compute in bf16 on fp32 master weights, gradients reach the fp32
    weights, and the log-probs and values come out fp32."""
    model = mark_autocast(AutoModelForCausalLM.from_pretrained(tiny_model_path), BF16)
    head = ValueHead(model.config.hidden_size)
    seen = []
    proj = model.model.layers[0].self_attn.q_proj
    handle = proj.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    ids = torch.randint(3, model.config.vocab_size, (2, 6))
    try:
        out = response_forward(model, ids, torch.ones_like(ids), 3, value_head=head)
    finally:
        handle.remove()
    assert seen == [BF16] and proj.weight.dtype == F32
    assert out.logprobs.dtype == F32 and out.values.dtype == F32
    (out.logprobs.sum() + out.values.sum()).backward()
    assert proj.weight.grad is not None and proj.weight.grad.dtype == F32
    unmarked = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    seen.clear()
    handle = unmarked.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m_, a, o: seen.append(o.dtype))
    response_forward(unmarked, ids, torch.ones_like(ids), 3)
    handle.remove()
    assert seen == [F32]


def test_decode_copy_refreshes_in_place(tiny_model_path):
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    copy = DecodeCopy(policy, BF16)
    ptrs = [p.data_ptr() for p in copy.model.parameters()]
    assert {p.dtype for p in copy.model.parameters()} == {BF16}
    with torch.no_grad():  # an optimizer step on the fp32 masters
        for p in policy.parameters():
            p.add_(torch.randn_like(p))
    copy.refresh()
    assert [p.data_ptr() for p in copy.model.parameters()] == ptrs  # captured CUDA graphs stay valid
    for dst, src in zip(copy.model.parameters(), policy.parameters()):
        assert torch.equal(dst, src.detach().to(BF16))
    assert not any(p.requires_grad for p in copy.model.parameters())


def test_local_backend_refreshes_before_each_generate(tiny_model_path):
    from transformers import AutoTokenizer

    from align.rollouts import RolloutEngine, SamplingParams

    order = []

    class Engine(RolloutEngine):
        def generate(self, *a, **kw):
            order.append("generate")
            return super().generate(*a, **kw)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    engine = Engine(model, AutoTokenizer.from_pretrained(tiny_model_path))
    backend = LocalBackend(engine, reward=None, refresh=lambda: order.append("refresh"))
    for _ in range(2):
        backend.generate(["1+1="], {}, torch.arange(1), SamplingParams(max_new_tokens=2))
    assert order == ["refresh", "generate"] * 2


def test_tf32_is_switched_on_only_when_resolved():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    try:
        matmul.fp32_precision = conv.fp32_precision = "ieee"
        apply_matmul_precision(resolve_precision("float32", False, CUDA))
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        apply_matmul_precision(resolve_precision("auto", False, CUDA))
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


def test_fp16_is_refused_by_the_resolver_too():
    with pytest.raises(ConfigError, match="float16 would train without a GradScaler"):
        resolve_precision("float16", True, CUDA)


@pytest.mark.gpu
def test_gpu_auto_loads_fp32_masters_bf16_reference_and_decode_copy(tiny_model_path):
    m = load_models(ModelConfig(path=str(tiny_model_path)), CUDA, need_reference=True, critic="separate")
    assert {p.dtype for p in m.policy.parameters()} == {F32}
    assert {p.dtype for p in m.reference.parameters()} == {BF16}
    assert {p.dtype for p in m.decode_model.parameters()} == {BF16}
    assert {p.dtype for p in m.critic.parameters()} == {F32}
    ids = torch.randint(3, m.policy.config.vocab_size, (2, 6), device="cuda")
    out = response_forward(m.policy, ids, torch.ones_like(ids), 3, with_entropy=True)
    assert out.logprobs.dtype == F32 and torch.isfinite(out.logprobs).all()
