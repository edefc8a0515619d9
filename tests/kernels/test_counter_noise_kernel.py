"""F4 (GPU readiness review): the Triton sampler draws the engine's counter-based noise in the kernel.

Against the PyTorch stream (`align.rollouts.noise.uniform_noise` / `align.rollouts.sampler.counter_gumbel`,
the independent reference): the hash and the uniforms are bit-identical (checked by applying the
interpreter's own float32 log to the reference uniforms); the Gumbel values agree to float32 rounding of the
two logs (the interpreter's numpy log and torch's CPU log differ by an ulp on some inputs; on CUDA both are
libdevice `logf`: the `gpu` test asks for bitwise equality); and the sampled tokens equal those drawn with the
reference noise injected, on the plain, candidate and full-row kernel paths and through the rollout engine.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from align import kernels
from align.kernels.counter import counter_gumbel_triton
from align.kernels.sampling import sample_triton
from align.kernels.sampling_reference import row_params
from align.rollouts.noise import sample_keys, uniform_noise
from align.rollouts.sampler import counter_gumbel

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TINY = torch.finfo(torch.float32).tiny


def _keys(b: int) -> torch.Tensor:
    return sample_keys(11, torch.arange(b) * 7919 + 5).to(DEV)


@pytest.mark.parametrize("step", [0, 2**40 + 17])
def test_in_kernel_noise_is_the_reference_stream(step):
    keys, v = _keys(4), 131
    got = counter_gumbel_triton(keys, torch.tensor([step], device=DEV), v).cpu()
    ref = counter_gumbel(keys, torch.tensor([step], device=DEV), torch.arange(v, device=DEV))[:, 0].cpu()
    u = uniform_noise(keys, step, v).clamp(TINY, 1.0 - 2.0**-24).cpu().numpy()
    if not CUDA:  # the integer hash and u exactly; the logs are the interpreter's (numpy float32)
        assert np.array_equal(got.numpy(), -np.log(-np.log(u)))
    torch.testing.assert_close(got, ref, rtol=2.5e-7, atol=2.5e-7)


CASES = [((0.8, 0, 1.0, 0.0), {}), ((1.0, 7, 0.9, 0.0), {}), ((1.0, 0, 0.85, 0.05), dict(cap=16))]


@pytest.mark.parametrize("params,kw", CASES, ids=["plain", "candidate", "full-row"])
def test_tokens_equal_sampling_with_the_reference_noise_injected(params, kw):
    torch.manual_seed(2)
    b, v = 6, 160
    x = (torch.randn(b, v) * 2).to(DEV)
    keys = _keys(b)
    for step in (5,):
        st = torch.tensor([step], device=DEV)
        g = counter_gumbel(keys, st, torch.arange(v, device=DEV))[:, 0]
        rp = row_params(x, *params)
        fused = sample_triton(x, rp, counter=(keys, st), **kw)
        injected = sample_triton(x, rp, noise=g, **kw)
        ref = kernels.sample(x, *params, noise=g, backend="torch", return_details=True)
        assert torch.equal(fused.tokens, injected.tokens) and torch.equal(fused.tokens, ref.tokens), step
        assert torch.equal(fused.logprobs, injected.logprobs)
        assert torch.equal(fused.sampling_logprobs, injected.sampling_logprobs)


def test_counter_argument_validation():
    x = torch.zeros(2, 8, device=DEV)
    keys, st = _keys(2), torch.zeros(1, dtype=torch.int64, device=DEV)
    with pytest.raises(ValueError, match="pass noise= or counter=, not both"):
        kernels.sample(x, backend="triton", counter=(keys, st), noise=torch.zeros(2, 8, device=DEV))
    with pytest.raises(ValueError, match=r"counter must be \(keys int64 \[2\], step int64 \[1\]\)"):
        kernels.sample(x, backend="triton", counter=(keys[:1], st))
    with pytest.raises(ValueError, match="counter= noise is drawn inside the Triton kernel"):
        kernels.sample(x, backend="torch", counter=(keys, st))


def test_engine_with_the_fused_draw_samples_the_reference_tokens(tiny_model_path):
    """The engine's Triton path (counter noise in the kernel) against its PyTorch path (noise materialised)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.rollouts import RolloutEngine, SamplingParams

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).to(DEV).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    params = SamplingParams(max_new_tokens=4, temperature=0.9, top_k=20, ignore_eos=True, seed=4)
    prompts, ids = ["1+2=", "hello", "7*8="], torch.tensor([3, 10, 11])
    fused = RolloutEngine(model, tok, sampler_backend="triton", counter_noise=True).generate(prompts, params, ids)
    ref = RolloutEngine(model, tok, sampler_backend="torch", counter_noise=True).generate(prompts, params, ids)
    assert torch.equal(fused.response_ids, ref.response_ids)
    torch.testing.assert_close(fused.logprobs, ref.logprobs, rtol=0, atol=2e-5)


@pytest.mark.gpu
def test_gpu_full_vocab_noise_and_tokens_bitwise():
    keys, v = _keys(8), 151_936
    st = torch.tensor([9], device="cuda")
    g = counter_gumbel(keys, st, torch.arange(v, device="cuda"))[:, 0]
    assert torch.equal(counter_gumbel_triton(keys, st, v), g)
    x = torch.randn(8, v, device="cuda", dtype=torch.bfloat16) * 3
    for params in ((1.0, 0, 1.0, 0.0), (0.7, 50, 0.9, 0.0), (1.0, 0, 0.9, 0.0)):
        rp = row_params(x, *params)
        assert torch.equal(sample_triton(x, rp, counter=(keys, st)).tokens, sample_triton(x, rp, noise=g).tokens)
