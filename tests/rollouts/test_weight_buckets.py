"""Bucketed weight sync (align.rollouts.weight_buckets): the plan covers every element once within the bucket
bound; tied weights are one entry; a real gloo broadcast (threads of this process, a private group) leaves the
receivers bitwise equal to the sender with no buffer above the bucket; a receiver whose sender stalls raises
within the timeout instead of hanging."""
from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from align.rollouts.weight_buckets import (
    WeightChannel,
    WeightSyncError,
    distinct_tensors,
    plan_buckets,
    receive_buckets,
    send_buckets,
)

pytestmark = pytest.mark.timeout(120)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tied(torch.nn.Module):
    """An embedding tied to the output layer (like Qwen2-0.5B), a bf16 buffer and tensors of several sizes."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Embedding(50, 16)
        self.hidden = torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, 50, bias=False)
        self.out.weight = self.embed.weight
        self.register_buffer("scale", torch.randn(7, generator=g).to(torch.bfloat16))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))


def test_plan_covers_every_element_once_within_the_bucket():
    model = Tied(0)
    entries, tensors = distinct_tensors(model.state_dict())
    names = [e.names for e in entries]
    assert ("embed.weight", "out.weight") in names  # tied: one entry, both names
    assert sum(len(n) for n in names) == len(model.state_dict()) and len(entries) == len(model.state_dict()) - 1
    for bucket_bytes in (4, 100, 1000, 64 * 4, 10**6):
        buckets = plan_buckets(entries, bucket_bytes)
        covered = {i: torch.zeros(e.numel, dtype=torch.int64) for i, e in enumerate(entries)}
        for b in buckets:
            size = torch.empty((), dtype=b.dtype).element_size()
            assert b.nbytes <= max(bucket_bytes, size)
            assert sum(p.stop - p.start for p in b.pieces) == b.numel
            offsets = sorted((p.offset, p.offset + p.stop - p.start) for p in b.pieces)
            assert offsets[0][0] == 0 and all(a[1] == c[0] for a, c in zip(offsets, offsets[1:]))  # no gaps, no overlap
            for p in b.pieces:
                assert entries[p.entry].dtype == b.dtype
                covered[p.entry][p.start:p.stop] += 1
        assert all(bool((c == 1).all()) for c in covered.values())  # every element of every tensor exactly once
    # a 10**6-byte bucket holds everything of a dtype: one bucket per dtype, in order of first appearance (the
    # root module's buffer comes first in its state dict)
    assert [b.dtype for b in plan_buckets(entries, 10**6)] == [torch.bfloat16, torch.float32]


def _run_group(world: int, bucket_bytes: int, sender_state, receiver_models, timeout_s: float = 30):
    port = _port()
    entries, tensors = distinct_tensors(sender_state)
    buckets = plan_buckets(entries, bucket_bytes)
    results: dict[int, object] = {}

    def rank(r: int):
        try:
            channel = WeightChannel("127.0.0.1", port, r, world, "gloo", timeout_s)
            try:
                if r == 0:
                    results[r] = send_buckets(tensors, entries, buckets, channel, torch.device("cpu"))
                else:
                    results[r] = receive_buckets(receiver_models[r - 1].state_dict(), entries, buckets, channel)
            finally:
                channel.close()
        except BaseException as err:  # noqa: BLE001 - reported by the test
            results[r] = err

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s + 30)
    return entries, buckets, results


def test_broadcast_makes_receivers_equal_with_bounded_buffers():
    sender = Tied(1)
    receivers = [Tied(2), Tied(3)]
    bucket_bytes = 256  # 64 fp32 elements: the 800-element embedding spans many buckets
    state = sender.state_dict()
    entries, buckets, results = _run_group(3, bucket_bytes, state, receivers)
    assert not [r for r in results.values() if isinstance(r, BaseException)], results
    sent = results[0]
    unique_bytes = sum(t.numel() * t.element_size() for n, t in state.items() if n != "out.weight")
    assert sent["bytes"] == unique_bytes  # the tied output layer is not sent a second time
    assert sent["buckets"] == len(buckets) > 10
    assert 0 < sent["largest_buffer_bytes"] <= bucket_bytes
    for r in (1, 2):
        assert 0 < results[r]["largest_buffer_bytes"] <= bucket_bytes
    for model in receivers:  # brute force: every tensor, every element, bitwise
        got = model.state_dict()
        assert got.keys() == state.keys()
        for k, v in state.items():
            assert torch.equal(got[k], v), k
        assert model.out.weight.data_ptr() == model.embed.weight.data_ptr()  # still tied


def test_receiver_of_a_stalled_sender_raises_within_the_timeout():
    """The sender joins the group but never broadcasts (a stalled trainer): the worker's receive raises a
    WeightSyncError after the group's timeout instead of blocking forever."""
    port = _port()
    entries, _ = distinct_tensors(Tied(0).state_dict())
    buckets = plan_buckets(entries, 1 << 20)
    out = {}
    release = threading.Event()

    def sender():
        channel = WeightChannel("127.0.0.1", port, 0, 2, "gloo", 3.0)
        release.wait(30)
        channel.close()

    def receiver():
        channel = WeightChannel("127.0.0.1", port, 1, 2, "gloo", 3.0)
        t0 = time.monotonic()
        try:
            receive_buckets(Tied(1).state_dict(), entries, buckets, channel)
            out["result"] = "returned"
        except WeightSyncError as err:
            out["result"] = str(err)
        out["elapsed"] = time.monotonic() - t0
        release.set()

    threads = [threading.Thread(target=f, daemon=True) for f in (sender, receiver)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out["result"].startswith("weight sync: the bucket 1/") or "did not complete within 3 s" in out["result"], out
    assert "\n" not in out["result"]
    assert out["elapsed"] < 20


def test_receiver_refuses_a_mismatched_model():
    entries, _ = distinct_tensors(Tied(0).state_dict())
    small = torch.nn.Linear(2, 2)
    with pytest.raises(WeightSyncError, match="has no tensor 'scale'"):
        receive_buckets(small.state_dict(), entries, plan_buckets(entries, 1024), channel=None)


def _sharded_rank(rank: int, ports: tuple[int, int], out_dir: str, bucket_bytes: int) -> None:
    """Ranks 0, 1: a trainer sharded with FSDP2 (DTensor parameters, gloo); rank 2: a rollout worker. Trainer
    rank 0 sends, rank 1 only joins the per-tensor gathers; the worker starts from other weights."""
    import datetime
    import json
    import os

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)

    def model(seed):
        torch.manual_seed(seed)
        # 7 and 5 output rows: uneven shards over 2 ranks
        return torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Linear(7, 5), torch.nn.Linear(5, 5, bias=False))

    result = {}
    try:
        if rank < 2:
            from torch.distributed.fsdp import fully_shard

            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[0]}", rank=rank, world_size=2,
                                    timeout=datetime.timedelta(seconds=60))
            m = model(0)
            for layer in m:
                fully_shard(layer)
            fully_shard(m)
            state = m.state_dict()
            result["sharded"] = all(type(v).__name__ == "DTensor" for v in state.values())
            entries, tensors = distinct_tensors(state)
            buckets = plan_buckets(entries, bucket_bytes)
            channel = WeightChannel("127.0.0.1", ports[1], 0, 2, "gloo", 60) if rank == 0 else None
            result |= send_buckets(tensors, entries, buckets, channel, torch.device("cpu"))
            if channel is not None:
                channel.close()
            dist.destroy_process_group()
        else:
            reference, target = model(0), model(1)
            entries, _ = distinct_tensors(reference.state_dict())
            channel = WeightChannel("127.0.0.1", ports[1], 1, 2, "gloo", 60)
            result |= receive_buckets(target.state_dict(), entries, plan_buckets(entries, bucket_bytes), channel)
            channel.close()
            result["equal"] = {k: torch.equal(v, reference.state_dict()[k]) for k, v in target.state_dict().items()}
    except BaseException as err:  # noqa: BLE001 - reported to the test
        result["error"] = f"{type(err).__name__}: {err}"
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


@pytest.mark.slow  # three spawned processes: ~40 s on 2 shared cores
def test_sharded_trainer_sync_gathers_per_tensor(tmp_path):
    """FSDP2-sharded weights (2 gloo ranks): the worker receives the full weights bitwise; the sender's buffers
    stay within the bucket and a gathered tensor is one tensor at a time (the largest is the 7 x 6 fp32 weight here)."""
    import json

    import torch.multiprocessing as mp

    bucket_bytes = 64
    ctx = mp.get_context("spawn")
    ports = (_port(), _port())
    procs = [ctx.Process(target=_sharded_rank, args=(r, ports, str(tmp_path), bucket_bytes)) for r in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(90)
    for p in procs:
        if p.is_alive():
            p.kill()
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert not [g["error"] for g in got if "error" in g], got
    assert got[0]["sharded"] and got[1]["sharded"]
    assert all(got[2]["equal"].values()) and len(got[2]["equal"]) == 5
    assert got[0]["bytes"] == 4 * (6 * 7 + 7 + 7 * 5 + 5 + 5 * 5)
    assert 0 < got[0]["largest_buffer_bytes"] <= bucket_bytes and got[2]["largest_buffer_bytes"] <= bucket_bytes
    assert got[0]["largest_gathered_bytes"] == 4 * 6 * 7 == got[1]["largest_gathered_bytes"]
