"""align.kernels.token_logprobs: values, entropy and gradients against float64, edge cases, peers."""

import math

import numpy as np
import pytest
import torch

from align import kernels

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
BACKENDS = ["triton", "torch"]


def _f64(logits, tokens, temperature=1.0):
    """float64 log-probs and entropy written out from the definitions."""
    z = logits.detach().double().cpu() / temperature
    logp = z - torch.logsumexp(z, dim=-1, keepdim=True)
    p = logp.exp()
    ent = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
    return logp.gather(-1, tokens.cpu().long().unsqueeze(-1)).squeeze(-1), ent


TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,temperature", [((4, 1000), 1.0), ((2, 3, 5000), 0.7)])
def test_forward_against_float64(backend, dtype, shape, temperature):
    torch.manual_seed(0)
    logits = (torch.randn(*shape) * 4).to(dtype).to(DEV)
    tokens = torch.randint(0, shape[-1], shape[:-1], device=DEV)
    logp, ent = kernels.token_logprobs(logits, tokens, temperature, with_entropy=True, backend=backend)
    ref_lp, ref_ent = _f64(logits, tokens, temperature)  # from the same (possibly rounded) logits
    assert logp.dtype == torch.float32 and logp.shape == tokens.shape and ent.shape == tokens.shape
    torch.testing.assert_close(logp.cpu().double(), ref_lp, rtol=0, atol=TOL[dtype])
    torch.testing.assert_close(ent.cpu().double(), ref_ent, rtol=0, atol=TOL[dtype])
    only = kernels.token_logprobs(logits, tokens, temperature, backend=backend)
    torch.testing.assert_close(only, logp, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_peaked_logits_stay_in_range(backend):
    # verl once returned positive log-probs on large logits: check logp <= 0 and 0 <= H <= log V
    torch.manual_seed(1)
    v = 2048
    logits = torch.randn(6, v) * 30
    logits[:, 5] = 4e4
    logits[1] = 1e4  # uniform row at a huge offset: H = log V
    logits[2, 100:] = float("-inf")
    tokens = torch.tensor([5, 7, 50, 5, 1000, 0])
    logits, tokens = logits.to(DEV), tokens.to(DEV)
    logp, ent = kernels.token_logprobs(logits, tokens, with_entropy=True, backend=backend)
    ref_lp, ref_ent = _f64(logits, tokens)
    assert (logp <= 0).all()
    assert (ent >= 0).all() and (ent <= math.log(v) + 1e-5).all()
    torch.testing.assert_close(logp.cpu().double(), ref_lp, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ent.cpu().double(), ref_ent, rtol=0, atol=2e-5)
    assert ent[1].item() == pytest.approx(math.log(v), abs=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_entropy", [False, True])
def test_gradients_against_float64(backend, with_entropy):
    torch.manual_seed(2)
    n, v, temperature = 5, 700, 0.8
    base = torch.randn(n, v) * 3
    base[0, :50] = float("-inf")  # masked vocabulary entries must get zero (not NaN) gradient
    tokens = torch.randint(50, v, (n,))
    g_lp, g_ent = torch.randn(n), torch.randn(n)

    x = base.clone().to(DEV).requires_grad_()
    out = kernels.token_logprobs(x, tokens.to(DEV), temperature, with_entropy=with_entropy, backend=backend)
    if with_entropy:
        loss = (out[0] * g_lp.to(DEV)).sum() + (out[1] * g_ent.to(DEV)).sum()
    else:
        loss = (out * g_lp.to(DEV)).sum()
    loss.backward()

    x64 = base.double().requires_grad_()
    z = x64 / temperature
    logp_all = z - torch.logsumexp(z, -1, keepdim=True)
    lp64 = logp_all.gather(-1, tokens[:, None]).squeeze(-1)
    loss64 = (lp64 * g_lp.double()).sum()
    if with_entropy:
        p = logp_all.exp()
        ent64 = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)
        loss64 = loss64 + (ent64 * g_ent.double()).sum()
    loss64.backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[0, :50] == 0).all()
    torch.testing.assert_close(x.grad.cpu().double(), x64.grad, rtol=0, atol=2e-6)


def test_bf16_gradient_dtype_and_values():
    torch.manual_seed(3)
    base = (torch.randn(3, 600) * 2).to(torch.bfloat16)
    tokens = torch.randint(0, 600, (3,))
    x = base.clone().to(DEV).requires_grad_()
    kernels.token_logprobs(x, tokens.to(DEV), backend="triton").sum().backward()
    assert x.grad.dtype == torch.bfloat16
    x64 = base.double().requires_grad_()
    torch.log_softmax(x64, -1).gather(-1, tokens[:, None]).sum().backward()
    torch.testing.assert_close(x.grad.cpu().double(), x64.grad, rtol=0, atol=4e-3)  # bf16 output rounding


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_tokens_give_nan(backend):
    logits = torch.randn(4, 50, device=DEV)
    tokens = torch.tensor([0, -100, 50, 49], device=DEV)
    logp = kernels.token_logprobs(logits, tokens, backend=backend)
    assert torch.isnan(logp[1]) and torch.isnan(logp[2])
    assert torch.isfinite(logp[[0, 3]]).all()


def test_matches_trl_selective_log_softmax():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    torch.manual_seed(4)
    logits = torch.randn(2, 3, 800) * 3
    tokens = torch.randint(0, 800, (2, 3))
    ours = kernels.token_logprobs(logits.to(DEV), tokens.to(DEV), temperature=0.9, backend="triton").cpu()
    theirs = trl_utils.selective_log_softmax(logits, tokens, temperature=0.9)
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-5)


def test_validation_and_auto_backend():
    logits = torch.randn(3, 20)
    tokens = torch.randint(0, 20, (3,))
    with pytest.raises(ValueError, match="temperature"):
        kernels.token_logprobs(logits, tokens, temperature=0.0)
    with pytest.raises(ValueError, match="do not match"):
        kernels.token_logprobs(logits, tokens[:2])
    with pytest.raises(ValueError, match="integer"):
        kernels.token_logprobs(logits, tokens.float())
    auto = kernels.token_logprobs(logits, tokens)
    ref = kernels.token_logprobs_reference(logits, tokens)
    assert torch.equal(auto, ref)


def test_per_row_temperature_tensor():
    torch.manual_seed(5)
    logits = torch.randn(3, 300, device=DEV)
    tokens = torch.randint(0, 300, (3,), device=DEV)
    temps = torch.tensor([0.5, 1.0, 2.0], device=DEV)
    got = kernels.token_logprobs(logits, tokens, temperature=temps, backend="triton")
    expected = np.array([_f64(logits[i : i + 1], tokens[i : i + 1], float(temps[i]))[0].item() for i in range(3)])
    np.testing.assert_allclose(got.cpu().numpy(), expected, atol=2e-5)


def test_strided_view_of_model_logits():
    # the usual call: logits[:, :-1] of a [B, T+1, V] model output, read through its strides
    torch.manual_seed(6)
    full = (torch.randn(2, 5, 300) * 2).to(DEV).requires_grad_()
    tokens = torch.randint(0, 300, (2, 4), device=DEV)
    lp = kernels.token_logprobs(full[:, :-1], tokens, backend="triton")
    g = torch.randn(2, 4, device=DEV)
    (lp * g).sum().backward()
    ref_full = full.detach().cpu().double().requires_grad_()
    ref = torch.log_softmax(ref_full[:, :-1], -1).gather(-1, tokens.cpu()[..., None]).squeeze(-1)
    (ref * g.cpu().double()).sum().backward()
    torch.testing.assert_close(lp.cpu().double(), ref.detach(), rtol=0, atol=2e-5)
    torch.testing.assert_close(full.grad.cpu().double(), ref_full.grad, rtol=0, atol=2e-6)
    assert (full.grad[:, -1] == 0).all()
