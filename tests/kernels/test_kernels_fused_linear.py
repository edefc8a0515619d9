"""align.kernels.fused_linear_logprobs: values and gradients against float64 full-logits math; never holds [N, V]."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from align import kernels

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _f64(hidden, weight, bias, tokens, temperature, with_entropy):
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    z = logits / temperature
    logp_all = z - torch.logsumexp(z, -1, keepdim=True)
    lp = logp_all.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return lp, None
    p = logp_all.exp()
    return lp, -(p * logp_all).sum(-1)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("with_bias,with_entropy", [(True, True), (False, False)])
def test_values_and_gradients_against_float64(backend, with_bias, with_entropy):
    torch.manual_seed(0)
    b, t, h, v, temperature = 2, 4, 16, 300, 0.9
    hidden = torch.randn(b, t, h)
    weight = torch.randn(v, h) * 0.5
    bias = torch.randn(v) if with_bias else None
    tokens = torch.randint(0, v, (b, t))
    g_lp, g_ent = torch.randn(b, t), torch.randn(b, t)

    leaves = [x.clone().to(DEV).requires_grad_() for x in (hidden, weight)]
    bias_d = bias.clone().to(DEV).requires_grad_() if with_bias else None
    out = kernels.fused_linear_logprobs(leaves[0], leaves[1], tokens.to(DEV), bias=bias_d, temperature=temperature,
                                        with_entropy=with_entropy, chunk_size=3, backend=backend)
    lp = out[0] if with_entropy else out
    loss = (lp * g_lp.to(DEV)).sum() + ((out[1] * g_ent.to(DEV)).sum() if with_entropy else 0)
    loss.backward()

    ref = [x.double().requires_grad_() for x in (hidden, weight)]
    bias64 = bias.double().requires_grad_() if with_bias else None
    lp64, ent64 = _f64(ref[0].reshape(-1, h), ref[1], bias64, tokens.reshape(-1), temperature, with_entropy)
    loss64 = (lp64 * g_lp.double().reshape(-1)).sum()
    if with_entropy:
        loss64 = loss64 + (ent64 * g_ent.double().reshape(-1)).sum()
        torch.testing.assert_close(out[1].cpu().double().reshape(-1), ent64.detach(), rtol=0, atol=2e-5)
    loss64.backward()
    assert lp.shape == (b, t)
    torch.testing.assert_close(lp.cpu().double().reshape(-1), lp64.detach(), rtol=0, atol=2e-5)
    torch.testing.assert_close(leaves[0].grad.cpu().double(), ref[0].grad, rtol=0, atol=1e-4)
    torch.testing.assert_close(leaves[1].grad.cpu().double(), ref[1].grad, rtol=0, atol=1e-4)
    if with_bias:
        torch.testing.assert_close(bias_d.grad.cpu().double(), bias64.grad, rtol=0, atol=1e-4)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


def test_never_materialises_full_logits():
    torch.manual_seed(1)
    n, h, v, chunk = 64, 8, 512, 8
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    tokens = torch.randint(0, v, (n,))
    with _LargestTensor() as mode:
        lp, ent = kernels.fused_linear_logprobs(hidden, weight, tokens, with_entropy=True, chunk_size=chunk,
                                                backend="torch")
        (lp.sum() + ent.sum()).backward()
    # weight-sized tensors (V * H) and per-chunk logits (chunk * V) are fine; [N, V] is not
    assert mode.largest <= max(chunk * v, v * h) < n * v
    assert hidden.grad is not None and weight.grad is not None


def test_frozen_weight_and_errors():
    hidden = torch.randn(5, 4, requires_grad=True)
    weight = torch.randn(30, 4)  # frozen lm_head (e.g. LoRA training)
    tokens = torch.randint(0, 30, (5,))
    kernels.fused_linear_logprobs(hidden, weight, tokens, chunk_size=2).sum().backward()
    assert hidden.grad is not None and weight.grad is None
    with pytest.raises(ValueError, match="weight"):
        kernels.fused_linear_logprobs(hidden, weight.T, tokens)
    with pytest.raises(ValueError, match="tokens"):
        kernels.fused_linear_logprobs(hidden, weight, tokens[:3])
    with pytest.raises(ValueError, match="temperature"):
        kernels.fused_linear_logprobs(hidden, weight, tokens, temperature=0.0)


def test_bf16_weight_gradient_does_not_depend_on_the_chunking():
    """GPU_READINESS F16: dW / dbias sum one product per chunk; each must be added into the fp32 buffer before
    any rounding. Rounding each chunk's contribution to bf16 first made 8% of dW's entries differ by more than
    one bf16 ulp between chunk sizes (up to ~900 ulp: advantages of both signs cancel across chunks)."""
    torch.manual_seed(0)
    n, h, v = 512, 32, 128
    hidden = torch.randn(n, h).bfloat16()
    weight0, bias0 = (torch.randn(v, h) * 0.1).bfloat16(), (torch.randn(v) * 0.1).bfloat16()
    tokens = torch.randint(0, v, (n,))
    g = torch.randn(n)  # signed per-token weights, like GRPO advantages

    def grads(chunk):
        w, b = weight0.clone().requires_grad_(), bias0.clone().requires_grad_()
        lp = kernels.fused_linear_logprobs(hidden, w, tokens, bias=b, chunk_size=chunk, backend="torch")
        (lp * g).sum().backward()
        assert w.grad.dtype == torch.bfloat16 and b.grad.dtype == torch.bfloat16
        return w.grad.double(), b.grad.double()

    one_w, one_b = grads(n)  # a single chunk: one fp32 product, rounded once
    for chunk in (1, 8):
        w_grad, b_grad = grads(chunk)
        ulp_w = (one_w.abs() * 2.0 ** -7).clamp_min(2.0 ** -126)
        ulp_b = (one_b.abs() * 2.0 ** -7).clamp_min(2.0 ** -126)
        assert ((w_grad - one_w).abs() <= ulp_w).all(), chunk
        assert ((b_grad - one_b).abs() <= ulp_b).all(), chunk


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_scale_and_softcap_against_float64(backend):
    """Cohere / Granite scale and Gemma-2 soft-capping inside the fused path: z = c * tanh(s * (h W^T + b) / c)."""
    torch.manual_seed(2)
    n, h, v, scale, cap, temperature = 10, 8, 200, 2.5, 1.5, 0.8
    hidden, weight, bias = torch.randn(n, h), torch.randn(v, h), torch.randn(v)
    tokens, g_lp = torch.randint(0, v, (n,)), torch.randn(n)
    leaves = [x.clone().to(DEV).requires_grad_() for x in (hidden, weight, bias)]
    lp = kernels.fused_linear_logprobs(leaves[0], leaves[1], tokens.to(DEV), bias=leaves[2], temperature=temperature,
                                       chunk_size=3, backend=backend, logit_scale=scale, softcap=cap)
    (lp * g_lp.to(DEV)).sum().backward()
    ref = [x.double().requires_grad_() for x in (hidden, weight, bias)]
    z = cap * torch.tanh(scale * (ref[0] @ ref[1].T + ref[2]) / cap) / temperature
    lp64 = (z - torch.logsumexp(z, -1, keepdim=True)).gather(-1, tokens[:, None])[:, 0]
    (lp64 * g_lp.double()).sum().backward()
    torch.testing.assert_close(lp.cpu().double(), lp64.detach(), rtol=0, atol=2e-5)
    for got, want in zip(leaves, ref):
        torch.testing.assert_close(got.grad.cpu().double(), want.grad, rtol=0, atol=1e-4)
