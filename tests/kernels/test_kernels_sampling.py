"""align.kernels.sample: support sets, G-tests against the renormalised target, bit-identical tokens with injected
noise (Triton vs the PyTorch reference), log-probs and rank against float64, invalid rows, validation."""

import math

import numpy as np
import pytest
import torch
from kernel_targets import g_test_pvalue, keep_set, log_softmax64, target_probs

from align import kernels
from align.kernels.sampling import sample_triton
from align.kernels.sampling_reference import gumbel_noise, row_params

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"

# a row with a clear probability ladder (no threshold sits within rounding distance of a boundary)
LADDER = [math.log(p) for p in (0.30, 0.22, 0.16, 0.12, 0.08, 0.05, 0.03, 0.02, 0.015, 0.01, 0.005)]

CONFIGS = [
    dict(temperature=1.0),
    dict(temperature=0.6),
    dict(temperature=1.0, top_k=3),
    dict(temperature=1.0, top_p=0.7),
    dict(temperature=1.3, top_k=5, top_p=0.8),
    dict(temperature=1.0, min_p=0.2),
    dict(temperature=0.8, top_k=6, top_p=0.9, min_p=0.3),
]


def _as_params(cfg):
    return (cfg.get("temperature", 1.0), cfg.get("top_k", 0), cfg.get("top_p", 1.0), cfg.get("min_p", 0.0))


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_reference_sampler_matches_renormalised_target(cfg):
    # 40,000 draws of one repeated row; G-test at a fixed seed, and no token outside the support, ever
    x = torch.tensor(LADDER, dtype=torch.float32).repeat(40_000, 1)
    gen = torch.Generator().manual_seed(1234)
    tokens, _ = kernels.sample(x, **cfg, generator=gen, backend="torch")
    target = target_probs(np.array(LADDER), *_as_params(cfg))
    tokens = tokens.numpy()
    assert set(np.unique(tokens)) <= set(np.flatnonzero(target > 0))
    assert g_test_pvalue(tokens, target) > 1e-3


def test_triton_internal_rng_matches_target():
    # the Triton path's own Philox noise (no injected noise): plain kernel and filtered kernel
    row = torch.tensor(LADDER[:6], dtype=torch.float32)
    gen = torch.Generator(device=DEV).manual_seed(7)
    plain, _ = kernels.sample(row.repeat(160, 1).to(DEV), temperature=0.9, generator=gen, backend="triton")
    t_plain = target_probs(row.numpy(), 0.9)
    assert g_test_pvalue(plain.cpu().numpy(), t_plain) > 1e-3

    filt, _ = kernels.sample(row.repeat(80, 1).to(DEV), top_k=4, top_p=0.85, generator=gen, backend="triton")
    t_filt = target_probs(row.numpy(), 1.0, 4, 0.85)
    filt = filt.cpu().numpy()
    assert set(np.unique(filt)) <= set(np.flatnonzero(t_filt > 0))
    assert g_test_pvalue(filt, t_filt) > 1e-3


def test_reference_support_sets_random_rows():
    # random rows and per-row parameters; every draw must lie in the independently computed support
    torch.manual_seed(0)
    b, v = 48, 200
    x = torch.randn(b, v) * 3
    temperature = torch.rand(b) * 1.5 + 0.1
    top_k = torch.randint(0, 40, (b,))
    top_p = torch.rand(b) * 0.9 + 0.1
    min_p = torch.where(torch.rand(b) < 0.5, torch.zeros(b), torch.rand(b) * 0.3)
    gen = torch.Generator().manual_seed(3)
    keeps = [
        keep_set(x[i].numpy(), float(temperature[i]), int(top_k[i]), float(top_p[i]), float(min_p[i]))
        for i in range(b)
    ]
    for _ in range(25):
        tok, _ = kernels.sample(x, temperature, top_k, top_p, min_p, generator=gen, backend="torch")
        for i in range(b):
            assert keeps[i][tok[i]], f"row {i} drew token {int(tok[i])} outside its support"


NOISE_CASES = [
    (97, dict()),
    (97, dict(temperature=0.7)),
    (97, dict(top_k=7)),
    (97, dict(top_p=0.6)),
    (97, dict(min_p=0.15, temperature=1.4)),
    (1500, dict(top_k=40, top_p=0.9)),  # several tiles per row
    (1500, dict(temperature=0.5)),
    (
        300,
        dict(  # per-row tensors, including greedy rows and disabled filters
            temperature=torch.tensor([1.0, 0.0, 0.7, 1.2, 0.0, 1.0]),
            top_k=torch.tensor([0, 5, 3, 299, 0, 20]),
            top_p=torch.tensor([0.9, 1.0, 0.5, 1.0, 0.3, 1.0]),
            min_p=torch.tensor([0.0, 0.0, 0.1, 0.05, 0.0, 0.2]),
        ),
    ),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v,cfg", NOISE_CASES, ids=[f"case{i}" for i in range(len(NOISE_CASES))])
def test_triton_tokens_bitwise_equal_reference_with_injected_noise(v, cfg, dtype):
    torch.manual_seed(v)
    x = (torch.randn(6, v) * 2.5).to(dtype).to(DEV)
    g = gumbel_noise((6, v), DEV, torch.Generator(device=DEV).manual_seed(v))
    a = kernels.sample(x, **cfg, noise=g, backend="triton", return_details=True)
    r = kernels.sample(x, **cfg, noise=g, backend="torch", return_details=True)
    assert torch.equal(a.tokens, r.tokens)
    assert torch.equal(a.rank, r.rank)
    torch.testing.assert_close(a.logprobs, r.logprobs, rtol=0, atol=2e-5)
    torch.testing.assert_close(a.sampling_logprobs, r.sampling_logprobs, rtol=0, atol=2e-5)


def test_log_probs_and_rank_against_float64():
    torch.manual_seed(5)
    b, v = 5, 257
    x = torch.randn(b, v) * 3
    cfg = dict(temperature=0.8, top_k=30, top_p=0.9, min_p=0.05)
    for backend in ("triton", "torch"):
        out = kernels.sample(x.to(DEV), **cfg, backend=backend, return_details=True,
                             generator=torch.Generator(device=DEV).manual_seed(1))
        tok = out.tokens.cpu().numpy()
        x64 = x.double().numpy()
        raw = log_softmax64(x64)
        for i in range(b):
            target = target_probs(x64[i], 0.8, 30, 0.9, 0.05)
            assert target[tok[i]] > 0
            assert out.logprobs[i].item() == pytest.approx(raw[i, tok[i]], abs=2e-5)
            assert out.sampling_logprobs[i].item() == pytest.approx(math.log(target[tok[i]]), abs=2e-5)
            assert out.rank[i].item() == int((x64[i] > x64[i, tok[i]]).sum())


def test_ties_and_masked_entries_equal_reference():
    # quantised logits (many exact ties at every threshold) and -inf entries, candidate and full-row paths
    torch.manual_seed(13)
    x = torch.round(torch.randn(6, 200) * 2)
    x[1, 50:] = float("-inf")
    x[4, :190] = float("-inf")  # fewer finite tokens than top_k
    x = x.to(DEV)
    g = gumbel_noise((6, 200), DEV, torch.Generator(device=DEV).manual_seed(8))
    cfg = dict(temperature=torch.tensor([1.0, 0.9, 1.1, 1.0, 1.0, 0.7]), top_k=torch.tensor([5, 3, 20, 0, 12, 8]),
               top_p=torch.tensor([0.8, 0.9, 0.5, 0.7, 1.0, 0.95]), min_p=0.0)
    r = kernels.sample(x, **cfg, noise=g, backend="torch", return_details=True)
    for kw in (dict(), dict(cap=16)):
        a = sample_triton(x, row_params(x, *_as_params(cfg)), noise=g, **kw)
        assert torch.equal(a.tokens, r.tokens), kw
        assert torch.equal(a.rank, r.rank), kw
        torch.testing.assert_close(a.sampling_logprobs, r.sampling_logprobs, rtol=0, atol=2e-5)
    for i in range(6):
        keep = keep_set(x[i].cpu().double().numpy(), float(cfg["temperature"][i]), int(cfg["top_k"][i]),
                        float(cfg["top_p"][i]), 0.0)
        assert keep[r.tokens[i].item()]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_greedy_rows_take_first_argmax(backend):
    x = torch.tensor([[0.0, 3.0, 1.0, 3.0], [2.0, -1.0, 2.0, 0.5], [-5.0, -4.0, -4.5, -6.0]]).to(DEV)
    out = kernels.sample(x, temperature=0.0, backend=backend, return_details=True)
    assert out.tokens.tolist() == [1, 0, 1]
    assert out.sampling_logprobs.tolist() == [0.0, 0.0, 0.0]
    assert out.rank.tolist() == [0, 0, 0]
    expected = log_softmax64(x.cpu().double().numpy())[[0, 1, 2], [1, 0, 1]]
    np.testing.assert_allclose(out.logprobs.cpu().numpy(), expected, atol=1e-6)
    # per-row greedy mixed with filtered sampling
    out2 = kernels.sample(x, temperature=torch.tensor([0.0, 1.0, 0.0]), top_k=2, backend=backend,
                          return_details=True, generator=torch.Generator(device=DEV).manual_seed(0))
    assert out2.tokens[0].item() == 1 and out2.tokens[2].item() == 1
    assert out2.tokens[1].item() in (0, 2)


def test_fallback_paths_equal_reference():
    # cap=16 forces the full-row bisection path (more than CAP candidates), block=16 makes k > KC,
    # and all-equal logits put more ties at the k-th value than the candidate buffer holds
    torch.manual_seed(11)
    x = torch.randn(4, 300).to(DEV) * 2
    g = gumbel_noise((4, 300), DEV, torch.Generator(device=DEV).manual_seed(2))
    for cfg, kw in [
        (dict(top_k=40, top_p=0.8), dict(cap=16)),
        (dict(top_k=100), dict(block=16, cap=32)),
        (dict(top_p=0.95, min_p=0.01), dict()),
    ]:
        params = row_params(x, *_as_params(cfg))
        a = sample_triton(x, params, noise=g, **kw)
        r = kernels.sample(x, **cfg, noise=g, backend="torch", return_details=True)
        assert torch.equal(a.tokens, r.tokens), (cfg, kw)
        assert torch.equal(a.rank, r.rank), (cfg, kw)
        torch.testing.assert_close(a.sampling_logprobs, r.sampling_logprobs, rtol=0, atol=2e-5)
    flat = torch.zeros(2, 64, device=DEV)
    gf = gumbel_noise((2, 64), DEV, torch.Generator(device=DEV).manual_seed(4))
    a = sample_triton(flat, row_params(flat, 1.0, 3, 1.0, 0.0), noise=gf, cap=16)
    # ties with the 3rd largest value are kept: all 64 tokens stay, each with probability 1/64
    assert torch.equal(a.tokens, torch.argmax(gf, dim=1))
    torch.testing.assert_close(a.sampling_logprobs.cpu(), torch.full((2,), -math.log(64)), rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy warns on the interpreter's log(0) of an all -inf row
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_invalid_rows_are_flagged_and_never_sampled_from_inf(backend):
    x = torch.randn(5, 40)
    x[0, 3] = float("nan")
    x[1] = float("-inf")
    x[2, 7] = float("inf")
    x[3, 20:] = float("-inf")  # valid row with masked tokens: they must never be drawn
    x = x.to(DEV)
    out = kernels.sample(x, top_k=10, top_p=0.9, backend=backend, return_details=True,
                         generator=torch.Generator(device=DEV).manual_seed(0))
    assert out.tokens[:3].tolist() == [-1, -1, -1]
    assert torch.isnan(out.logprobs[:3]).all() and torch.isnan(out.sampling_logprobs[:3]).all()
    assert out.rank[:3].tolist() == [-1, -1, -1]
    assert 0 <= out.tokens[3].item() < 20 and 0 <= out.tokens[4].item() < 40
    assert torch.isfinite(out.logprobs[3:]).all()
    plain = kernels.sample(x, backend=backend, generator=torch.Generator(device=DEV).manual_seed(0))
    assert plain[0][:3].tolist() == [-1, -1, -1] and 0 <= plain[0][3].item() < 20
    with pytest.raises(ValueError, match="NaN"):
        kernels.sample(x, backend=backend, check=True)


def test_noise_never_turns_minus_inf_into_a_draw():
    # many draws of a row that is -inf except for three tokens (torch path; triton shares the mask logic)
    x = torch.full((20_000, 50), float("-inf"))
    x[:, [4, 17, 33]] = torch.tensor([0.0, 1.0, -1.0])
    tok, lp = kernels.sample(x, backend="torch", generator=torch.Generator().manual_seed(0))
    assert set(tok.unique().tolist()) == {4, 17, 33}
    assert torch.isfinite(lp).all()


def test_generator_reproducibility():
    x = torch.randn(8, 500).to(DEV)
    a, _ = kernels.sample(x, top_k=50, backend="triton", generator=torch.Generator(device=DEV).manual_seed(5))
    b, _ = kernels.sample(x, top_k=50, backend="triton", generator=torch.Generator(device=DEV).manual_seed(5))
    c, _ = kernels.sample(x, top_k=50, backend="triton", generator=torch.Generator(device=DEV).manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_validation_messages(monkeypatch):
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match="top_p"):
        kernels.sample(x, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        kernels.sample(x, top_k=-1)
    with pytest.raises(ValueError, match="temperature"):
        kernels.sample(x, temperature=-0.5)
    with pytest.raises(ValueError, match="min_p"):
        kernels.sample(x, min_p=2.0)
    with pytest.raises(ValueError, match="backend"):
        kernels.sample(x, backend="cuda")
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        kernels.sample(x[0])
    with pytest.raises(ValueError, match="noise"):
        kernels.sample(x, noise=torch.zeros(2, 9))
    with pytest.raises(ValueError, match="rows"):
        kernels.sample(x, top_k=torch.tensor([1, 2, 3]))
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="CUDA"):
            kernels.sample(x, backend="triton")


def test_auto_backend_on_cpu_is_the_reference():
    x = torch.randn(4, 30)
    g = gumbel_noise((4, 30), "cpu")
    auto = kernels.sample(x, top_k=5, noise=g, return_details=True)
    ref = kernels.sample_reference(x, top_k=5, noise=g, return_details=True)
    assert all(torch.equal(a, b) for a, b in zip(auto, ref))


gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@pytest.mark.gpu
@gpu
def test_gpu_full_vocab_matches_reference():
    torch.manual_seed(0)
    x = torch.randn(16, 151_936, device="cuda") * 3
    g = gumbel_noise(x.shape, "cuda")
    for cfg in (dict(), dict(top_k=50, top_p=0.9), dict(top_p=0.9), dict(min_p=0.1), dict(top_k=1000)):
        a = kernels.sample(x, **cfg, noise=g, backend="triton", return_details=True)
        r = kernels.sample(x, **cfg, noise=g, backend="torch", return_details=True)
        assert torch.equal(a.tokens, r.tokens), cfg
        assert torch.equal(a.rank, r.rank), cfg


@pytest.mark.gpu
@gpu
def test_gpu_int64_offsets():
    v = 151_936
    b = (2**31) // v + 2  # B * V > 2^31: the last rows need 64-bit offsets
    x = torch.randn(b, v, device="cuda", dtype=torch.bfloat16)
    g = gumbel_noise((4, v), "cuda")
    noise = torch.zeros(b, v, device="cuda")
    noise[-4:] = g
    a = kernels.sample(x, top_k=20, noise=noise, backend="triton", return_details=True)
    r = kernels.sample(x[-4:], top_k=20, noise=g, backend="torch", return_details=True)
    assert torch.equal(a.tokens[-4:], r.tokens)
    lp = kernels.token_logprobs(x, torch.zeros(b, dtype=torch.long, device="cuda"), backend="triton")
    ref = torch.log_softmax(x[-4:].float(), -1)[:, 0]
    torch.testing.assert_close(lp[-4:], ref, rtol=0, atol=1e-4)


@pytest.mark.gpu
@gpu
def test_gpu_cuda_graph_capture():
    x = torch.randn(32, 32_000, device="cuda")
    kernels.sample(x, top_k=50, top_p=0.9)  # warm up / compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tok, lp = kernels.sample(x, top_k=50, top_p=0.9)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        top50 = torch.topk(x, 50, dim=-1).indices
        assert (top50 == tok[:, None]).any(-1).all()
