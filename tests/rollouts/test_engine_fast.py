"""The fast rollout engine: static KV cache, device-counter (CUDA-graph-safe) decode step, lean CPU sampler,
counter noise, per-row early stop, log-prob agreement with the trainer, CUDA graphs (GPU only)."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from align import kernels
from align.rollouts import RolloutEngine, SamplingParams
from align.rollouts.engine import ScalarSampler, _Graph, counter_gumbel
from align.rollouts.noise import sample_keys, uniform_noise
from align.trainer.forward import response_forward

PROMPTS = ["1+2=", "33+44=", "7", "hello world, ", "abc", "(9*9)="]


@pytest.fixture(scope="module")
def qwen(tiny_qwen_path):
    return AutoModelForCausalLM.from_pretrained(tiny_qwen_path).eval(), AutoTokenizer.from_pretrained(tiny_qwen_path)


@pytest.fixture(scope="module")
def llama(tiny_model_path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_path).eval(), AutoTokenizer.from_pretrained(tiny_model_path)


def _graph_style(model, tok, **kw) -> RolloutEngine:
    """Static cache + the device-counter decode step that CUDA graphs capture, run eagerly on the CPU."""
    engine = RolloutEngine(model, tok, static_cache=True, **kw)
    engine._tensor_steps = True
    return engine


def test_counter_gumbel_is_the_noise_module_stream():
    keys = sample_keys(11, torch.tensor([0, 5, 2**40]))
    steps = [0, 1, 63, 1000]
    g = counter_gumbel(keys, torch.tensor(steps), torch.arange(257))
    for i, step in enumerate(steps):
        u = uniform_noise(keys, step, 257).double()
        ref = -torch.log(-torch.log(u.clamp(torch.finfo(torch.float32).tiny, 1 - 2.0**-24)))  # Gumbel(0, 1)
        assert torch.allclose(g[:, i].double(), ref, rtol=0, atol=1e-5)
        assert torch.equal(g[:, i], -torch.log(-torch.log(uniform_noise(keys, step, 257).clamp(
            torch.finfo(torch.float32).tiny, 1 - 2.0**-24))))  # the same float32 numbers, bit for bit


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.0, 5, 1.0, 0.0), (1.0, 0, 0.6, 0.0), (0.8, 7, 0.9, 0.0),
    (1.3, 0, 1.0, 0.2), (1.0, 4, 0.5, 0.05), (0.0, 0, 1.0, 0.0), (1.0, 1, 1.0, 0.0), (1.0, 40, 1.0, 0.0),
])
def test_scalar_sampler_equals_reference(temperature, top_k, top_p, min_p):
    gen = torch.Generator().manual_seed(0)
    b, v = 12, 40
    x = torch.randn(b, v, generator=gen) * 3
    x[1, ::3] = x[1, 0]  # ties at the top
    x[2, :30] = float("-inf")  # fewer finite entries than top_k
    x[3] = x[3].round()  # many ties
    x[4, 7] = float("nan")  # invalid rows: NaN, +inf, all -inf
    x[5, 3] = float("inf")
    x[6] = float("-inf")
    noise = -torch.log(-torch.log(torch.rand(b, v, generator=gen).clamp(1e-30, 1 - 2.0**-24)))
    ref = kernels.sample_reference(x, temperature, top_k, top_p, min_p, noise=noise, return_details=True)
    out = ScalarSampler(v, temperature, top_k, top_p, min_p, x.device)(x, noise)
    assert torch.equal(out.tokens, ref.tokens)
    ok = ref.tokens >= 0
    assert ok.sum() == b - 3
    assert torch.equal(out.rank[ok], ref.rank[ok])
    assert torch.allclose(out.logprobs[ok], ref.logprobs[ok], rtol=0, atol=1e-6)  # log-softmax rounding only
    assert torch.allclose(out.sampling_logprobs[ok], ref.sampling_logprobs[ok], rtol=0, atol=1e-6)


def test_scalar_sampler_on_a_hand_computed_row():
    # logits log(0.5), log(0.3), log(0.2); noise picks token 1 among {0, 1} after top-p 0.7 (0.5 + 0.3 >= 0.7)
    x = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    noise = torch.tensor([[0.0, 2.0, 5.0]])
    out = ScalarSampler(3, 1.0, 0, 0.7, 0.0, x.device)(x, noise)
    assert out.tokens.item() == 1 and out.rank.item() == 1
    assert math.isclose(out.logprobs.item(), math.log(0.3), abs_tol=1e-6)
    assert math.isclose(out.sampling_logprobs.item(), math.log(0.3 / 0.8), abs_tol=1e-6)


@pytest.mark.parametrize("arch", ["qwen", "llama"])
def test_static_cache_and_graph_style_step_match_hf_greedy(arch, request):
    model, tok = request.getfixturevalue(arch)
    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    ref = model.generate(**enc, max_new_tokens=10, do_sample=False, min_new_tokens=10, pad_token_id=tok.pad_token_id)
    params = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
    for engine in (RolloutEngine(model, tok, static_cache=True, micro_batch_size=3), _graph_style(model, tok)):
        assert torch.equal(engine.generate(PROMPTS, params).response_ids, ref[:, enc.input_ids.shape[1]:])


def test_graph_style_step_equals_host_step_with_stops_and_masks(qwen):
    """The device-counter step (what a CUDA graph replays) samples exactly what the host-indexed step does,
    with counter noise, top-k/top-p, min_new_tokens suppression, allowed tokens and stop tokens."""
    model, tok = qwen
    allowed = tok.convert_tokens_to_ids(list("0123456789+=")) + [tok.eos_token_id]
    stop = tok.convert_tokens_to_ids(["="])
    for params in (SamplingParams(max_new_tokens=12, top_k=20, top_p=0.9, seed=4, stop_token_ids=stop,
                                  min_new_tokens=3),
                   SamplingParams(max_new_tokens=9, temperature=0.8, min_p=0.05, allowed_token_ids=allowed, seed=1)):
        host = RolloutEngine(model, tok, micro_batch_size=4).generate(PROMPTS, params)
        dev = _graph_style(model, tok, micro_batch_size=4, sync_every=5).generate(PROMPTS, params)
        assert torch.equal(host.response_ids, dev.response_ids) and torch.equal(host.mask, dev.mask)
        assert torch.allclose(host.logprobs, dev.logprobs, atol=1e-5)
        assert torch.allclose(host.sampling_logprobs, dev.sampling_logprobs, atol=1e-5)
        assert torch.equal(host.topk_hit, dev.topk_hit)
        assert (dev.mask.sum(-1) >= max(1, params.min_new_tokens)).all()
        if params.allowed_token_ids:
            assert set(dev.response_ids[dev.mask.bool()].tolist()) <= set(allowed)
        else:  # the first "=" ends a row, never before token 3
            for ids, m in zip(dev.response_ids.tolist(), dev.mask.sum(-1).tolist()):
                assert stop[0] not in ids[:m - 1] and (m == 12 or ids[m - 1] == stop[0]) and m >= 3


def test_graph_control_flow_on_cpu(qwen):
    """The CUDA-graph bookkeeping (warm-up step, capture, replays, padded rows and prompt buckets, graph reuse
    across calls) with a stand-in graph whose replay runs the captured step eagerly on the CPU."""
    model, tok = qwen

    class ReplayGraph:
        def __init__(self, fn):
            self.fn, self.replays = fn, 0

        def replay(self):
            self.replays += 1
            self.fn()

    engine = _graph_style(model, tok, micro_batch_size=4, sync_every=4, prompt_bucket=8)
    engine.cuda_graphs = True
    captured = []

    def capture(state, sampler):
        engine._decode_step(state, sampler, None)  # the warm-up step runs; the capture itself does not
        graph = ReplayGraph(lambda: engine._decode_step(state, sampler, None))
        captured.append(graph)
        return _Graph(graph, state, sampler)

    engine._capture = capture
    stop = tok.convert_tokens_to_ids(["="])
    params = SamplingParams(max_new_tokens=10, top_k=20, seed=7, stop_token_ids=stop)
    ref = RolloutEngine(model, tok, micro_batch_size=4).generate(PROMPTS, params)
    for call in range(2):
        out = engine.generate(PROMPTS, params)
        assert torch.equal(out.response_ids, ref.response_ids) and torch.equal(out.mask, ref.mask)
        assert torch.equal(out.prompt_ids, ref.prompt_ids) and torch.allclose(out.logprobs, ref.logprobs, atol=1e-5)
        assert len(captured) == 2 and len(engine._graphs) == 2  # micro-batches of 4 and 2 (padded to 2) rows
    assert all(g.replays > 0 for g in captured)


def test_rows_stop_early_and_masks_are_right(qwen):
    """Each row ends at its own stop token; late host checks (sync_every) only cost extra steps."""
    model, tok = qwen
    greedy = RolloutEngine(model, tok).generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=0.0,
                                                                        ignore_eos=True))
    stop = greedy.response_ids[0, 2].item()  # row 0 stops at its third token (or earlier)
    params = SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=[stop], ignore_eos=True)
    for sync_every in (1, 3):
        out = RolloutEngine(model, tok, sync_every=sync_every, static_cache=sync_every == 3).generate(PROMPTS, params)
        for i in range(len(PROMPTS)):
            row = greedy.response_ids[i].tolist()
            n = row.index(stop) + 1 if stop in row else 8  # hand-derived length: up to and including the stop
            assert out.mask[i].tolist() == [1] * n + [0] * (out.mask.shape[1] - n)
            assert out.response_ids[i, :n].tolist() == row[:n]
            assert (out.response_ids[i, n:] == tok.pad_token_id).all() and (out.logprobs[i, n:] == 0).all()
        assert out.mask.shape[1] == out.mask.sum(-1).max()


@pytest.mark.parametrize("static", [False, True])
def test_logprob_agreement_with_trainer_fp32(qwen, static):
    """Documented tolerance (rollouts/engine.py, docs/engine.md): fp32 CPU max |rollout - recomputed| < 1e-4."""
    model, tok = qwen
    engine = RolloutEngine(model, tok, micro_batch_size=4, static_cache=static)
    batch = engine.generate(PROMPTS * 2, SamplingParams(max_new_tokens=16, top_k=30, top_p=0.95, seed=2))
    fwd = response_forward(model, batch.input_ids, batch.attention_mask, batch.response_ids.shape[1])
    m = batch.mask.bool()
    assert (fwd.logprobs[m] - batch.logprobs[m]).abs().max() < 1e-4
    # the outputs are ordinary tensors (generation runs in inference mode): autograd can use them
    w = torch.ones((), requires_grad=True)
    (w * batch.logprobs * batch.mask).sum().backward()
    assert w.grad is not None


def test_invalid_logits_raise(qwen):
    model, tok = qwen
    # decode steps (one position) produce NaN logits
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: out * float("nan") if out.shape[1] == 1 else out)
    try:
        for static in (False, True):
            with pytest.raises(FloatingPointError, match="NaN"):
                engine = RolloutEngine(model, tok, static_cache=static, sync_every=3)
                engine.generate(["1+"], SamplingParams(max_new_tokens=6))
    finally:
        hook.remove()


def test_option_errors(qwen):
    model, tok = qwen
    with pytest.raises(ValueError, match="cuda_graphs"):
        RolloutEngine(model, tok, cuda_graphs=True)
    with pytest.raises(ValueError, match="micro_batch_size"):
        RolloutEngine(model, tok, micro_batch_size=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_equals_eager(tiny_qwen_path):
    """Graph replays sample exactly what the eager step samples (counter noise: no RNG-stream differences),
    in fp32 and bf16, and a second call reuses the captured graph."""
    tok = AutoTokenizer.from_pretrained(tiny_qwen_path)
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(tiny_qwen_path, dtype=dtype).cuda().eval()
        params = SamplingParams(max_new_tokens=24, top_k=20, top_p=0.9, seed=5, stop_token_ids=[tok.eos_token_id])
        greedy = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
        graph = RolloutEngine(model, tok, counter_noise=True, micro_batch_size=4)
        assert graph.cuda_graphs and graph.static_cache
        # the same device-counter step and padded shapes, launched eagerly: only the graph replay differs
        eager = RolloutEngine(model, tok, counter_noise=True, micro_batch_size=4, cuda_graphs=False)
        eager._tensor_steps = eager._pad_shapes = True
        for p in (params, greedy):
            a, b = graph.generate(PROMPTS, p), eager.generate(PROMPTS, p)
            assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.mask, b.mask)
            assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)
        n = len(graph._graphs)
        again = graph.generate(PROMPTS, params)
        assert len(graph._graphs) == n
        assert torch.equal(again.response_ids, graph.generate(PROMPTS, params).response_ids)
        # generator path (Philox in the Triton sampler): valid tokens, log-probs agree with the trainer
        batch = RolloutEngine(model, tok).generate(PROMPTS, SamplingParams(max_new_tokens=16, top_k=20))
        fwd = response_forward(model, batch.input_ids, batch.attention_mask, batch.response_ids.shape[1])
        m = batch.mask.bool()
        tol = 1e-3 if dtype == torch.float32 else 0.1  # docs/engine.md
        assert (fwd.logprobs[m] - batch.logprobs[m]).abs().max() < tol
