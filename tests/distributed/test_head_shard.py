"""The output embedding is sharded under FSDP2 and the trainer's forward gathers it (2 gloo ranks on CPU).

Reference: one process, the unsharded model, `response_forward` on all 4 rows and a backward of a fixed loss.
Each of 2 ranks shards the same model (`shard_module`), runs `response_forward` on its 2 rows and the backward of
its share of the same loss (a sum over rows, so the summed gradients are the reference's). The head's parameter
must be a DTensor holding half of the vocabulary rows on each rank; log-probs, entropies and the full gradients of
the head (and, tied, of the one shared embedding) must equal the reference's.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

ROWS, PROMPT, RESPONSE, VOCAB = 4, 5, 4, 96


def tiny(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg)


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (ROWS, PROMPT + RESPONSE), generator=g)
    att = torch.ones_like(ids)
    att[0, :2] = 0  # a left-padded prompt and a right-padded response
    att[3, -1] = 0
    return ids, att


def loss_of(fwd, rows: slice) -> torch.Tensor:
    # fixed per-row weights: every log-prob and entropy gets a distinct gradient
    w = torch.arange(1, ROWS * RESPONSE + 1, dtype=torch.float32).reshape(ROWS, RESPONSE)[rows] / 10
    return (fwd.logprobs * w).sum() + 0.3 * fwd.entropy.sum()


def forward(model, ids, att, fused: bool, packed: bool):
    from align.trainer import forward as fw
    from align.trainer.packing import maybe_packed

    fw.SMALL_LOGITS = 0 if fused else 1 << 22  # fused: the chunked kernel reads the head's weight
    return fw.response_forward(maybe_packed(model, packed), ids, att, RESPONSE, with_entropy=True)


def grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():  # a tied weight is listed once
        if "lm_head" in name or "embed_tokens" in name:
            g = p.grad
            out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().numpy().copy()
    return out


CASES = {"untied-matmul": (False, False, False), "tied-fused-packed": (True, True, True)}  # tied, fused, packed


def rank_main(rank: int, port: int, queue) -> None:
    """Every case in one process group (one start-up); rank r puts {(case, r): results}."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for case, (tied, fused, packed) in CASES.items():
            queue.put({(case, rank): one_case(rank, tied, fused, packed)})
    finally:
        dist.destroy_process_group()


def one_case(rank: int, tied: bool, fused: bool, packed: bool) -> dict:
    from types import SimpleNamespace

    from align.distributed.fsdp import shard_module

    model = tiny(tied)
    shard_module(model, SimpleNamespace(mixed_precision="none", cpu_offload=False, reshard_after_forward=True))
    w = model.get_output_embeddings().weight
    layout = {"dtensor": hasattr(w, "to_local"), "rows": tuple(w.shape)[0],
              "local_rows": (w.to_local() if hasattr(w, "to_local") else w).shape[0],
              "one_param": w is model.get_input_embeddings().weight,
              "n_params": len(list(model.parameters()))}
    ids, att = batch()
    rows = slice(2 * rank, 2 * rank + 2)
    fwd = forward(model, ids[rows], att[rows], fused, packed)
    loss_of(fwd, rows).backward()
    after = model.get_output_embeddings().weight  # resharded after forward and after backward
    layout["sharded_after"] = hasattr(after, "to_local") and after.to_local().shape[0] == VOCAB // 2
    # numpy arrays: a queued torch tensor is shared memory that dies with this process
    return {"layout": layout, "logprobs": fwd.logprobs.detach().numpy(), "entropy": fwd.entropy.detach().numpy(),
            "grads": grads(model)}


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    """{(case, rank): results} of the 2 spawned ranks; a rank that fails or hangs fails the tests within 180 s."""
    import queue as queues
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    deadline, got = time.monotonic() + 180, {}
    try:  # read before joining: a rank blocks on a full pipe until its results are read
        while len(got) < 2 * len(CASES) and all(p.exitcode in (None, 0) for p in procs):
            try:
                got.update(queue.get(timeout=max(0.1, min(1.0, deadline - time.monotonic()))))
            except queues.Empty:
                assert time.monotonic() < deadline, "the 2 ranks did not finish within 180 s"
        for p in procs:
            p.join(max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert len(got) == 2 * len(CASES) and all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return got


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", list(CASES))
def test_head_is_sharded_and_gathered_for_the_forward(case, two_ranks):
    torch.set_num_threads(1)
    tied, fused, packed = CASES[case]
    ref_model = tiny(tied)
    ids, att = batch()
    ref = forward(ref_model, ids, att, fused, packed)
    loss_of(ref, slice(None)).backward()
    want = grads(ref_model)

    got, other = two_ranks[(case, 0)], two_ranks[(case, 1)]
    layout = got["layout"]
    assert layout["dtensor"] and layout["rows"] == VOCAB
    assert layout["local_rows"] == other["layout"]["local_rows"] == VOCAB // 2  # 1/N of the rows on each rank
    assert layout["sharded_after"]
    assert layout["one_param"] is tied
    assert layout["n_params"] == len(list(ref_model.parameters()))  # the tied weight stays one parameter
    logprobs = torch.cat([torch.from_numpy(got["logprobs"]), torch.from_numpy(other["logprobs"])])
    entropy = torch.cat([torch.from_numpy(got["entropy"]), torch.from_numpy(other["entropy"])])
    assert torch.allclose(logprobs, ref.logprobs.detach(), atol=1e-5, rtol=1e-5)
    assert torch.allclose(entropy, ref.entropy.detach(), atol=1e-5, rtol=1e-5)
    assert got["grads"].keys() == want.keys()
    for name in want:  # both ranks gathered the same full gradient
        assert (got["grads"][name] == other["grads"][name]).all(), name
    for name, g in want.items():
        have = torch.from_numpy(got["grads"][name])
        g = torch.from_numpy(g)
        assert float(g.abs().max()) > 0, name
        assert torch.allclose(have, g, atol=1e-5, rtol=1e-4), (name, float((have - g).abs().max()))
