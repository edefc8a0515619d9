"""FSDP2 sharding: per-rank bytes of parameters + gradients + AdamW state, and the step time, at 1 and N ranks.

    python benchmarks/sharding.py                            # CPU, gloo, 1 and 2 ranks, 1 thread each
    torchrun --nproc_per_node 8 benchmarks/sharding.py --device cuda --hidden 4096 --layers 32 --ranks-from-env
                                                             # 1 node x 8 GPUs (NCCL): a 7B-shaped Llama

Each rank builds the same random Llama, wraps it as the trainer does (`align.distributed.fsdp.shard_module`: one
shard group per decoder layer, then the decoder, then the root with the output embedding), runs forward +
backward + AdamW on its share of a fixed global batch (global rows / N each), and counts the bytes of what it
holds: its parameter shards, gradient shards and optimizer moments. Bytes per rank ~ 1/N of the one-rank figure
(every tensor's dim 0 split over the ranks; rounding up where a dim 0 does not divide). Step time is the median
of `repeats` steps after a warm-up. The packing rows (tokens/s with and without sequence packing on a batch of
mixed lengths) come from `benchmarks/packing.py`'s `run()` when that script is in the tree.
Prints a table last and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def tiny_llama(hidden: int, layers: int, vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 4 // 1, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      max_position_embeddings=4096, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds: parameter shards, gradient shards, optimizer state (local shards of DTensors)."""
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    params = sum(local(p).numel() * local(p).element_size() for p in model.parameters())
    grads = sum(local(p.grad).numel() * local(p.grad).element_size() for p in model.parameters() if p.grad is not None)
    state = sum(local(v).numel() * local(v).element_size() for s in optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {"params": params, "grads": grads, "optimizer": state, "total": params + grads + state}


def rank_main(rank: int, world: int, port: int, args: dict, out: dict) -> None:
    torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    if device.type == "cuda":  # before the process group: NCCL binds each rank to its own GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    if world > 1:
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world)
    model = tiny_llama(args["hidden"], args["layers"], args["vocab"]).to(device)
    if world > 1:
        from align.distributed.fsdp import shard_module

        cfg = argparse.Namespace(mixed_precision="none", cpu_offload=False, reshard_after_forward=True)
        shard_module(model, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    rows = args["rows"] // world
    ids = torch.randint(0, args["vocab"], (args["rows"], args["seq"]), generator=g)[rank * rows:(rank + 1) * rows]
    ids = ids.to(device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss / world
        loss.backward()  # the model's forward runs the root's hooks: the lm_head shard is gathered, then reduce-scattered
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the gradient buffers: they are part of what a rank holds

    step()
    times = []
    for _ in range(args["repeats"]):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        out.update(world=world, bytes=held_bytes(model, opt), step_s=statistics.median(times),
                   tokens_per_s=args["rows"] * args["seq"] / statistics.median(times))
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def _spawned(rank, world, port, args, queue):
    out: dict = {}
    rank_main(rank, world, port, args, out)
    if rank == 0:
        queue.put(out)


def measure(world: int, args: dict, timeout_s: float = 600) -> dict:
    if world == 1:
        out: dict = {}
        rank_main(0, 1, 0, args, out)
        return out
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_spawned, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    if alive or any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"{world}-rank measurement failed (exit codes {[p.exitcode for p in procs]})")
    return queue.get()


def packing_rows() -> dict | None:
    """Hook: benchmarks/packing.py's run() (tokens/s with and without packing), when that script is in the tree."""
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        import packing
    except ImportError:
        return None
    return packing.run()


def table(results: list[dict], packed: dict | None) -> str:
    base = results[0]["bytes"]["total"]
    lines = ["| ranks | params MiB | grads MiB | AdamW MiB | total MiB / rank | vs 1 rank | step s | tokens/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        b = r["bytes"]
        lines.append(f"| {r['world']} | {b['params'] / 2**20:.2f} | {b['grads'] / 2**20:.2f} | "
                     f"{b['optimizer'] / 2**20:.2f} | {b['total'] / 2**20:.2f} | {b['total'] / base:.3f} | "
                     f"{r['step_s']:.3f} | {r['tokens_per_s']:,.0f} |")
    if packed is None:
        lines.append("packing rows: benchmarks/packing.py is not in this tree (hook: packing_rows())")
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        import packing

        lines.append(packing.table(packed))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--ranks-from-env", action="store_true", help="run as one rank of torchrun (GPU command)")
    p.add_argument("--no-packing", action="store_true")
    p.add_argument("--out", default="benchmarks/results/sharding_cpu.json")
    a = p.parse_args()
    args = {k: getattr(a, k) for k in ("device", "hidden", "layers", "vocab", "rows", "seq", "repeats", "threads")}
    if a.ranks_from_env:  # torchrun: this process is one rank; rank 0 prints its row
        out: dict = {}
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        rank_main(rank, world, int(os.environ["MASTER_PORT"]), args, out)
        if rank == 0:
            print(json.dumps(out))
        return
    results = [measure(w, args) for w in a.ranks]
    packed = None if a.no_packing else packing_rows()
    meta = {"bench": "sharding", "machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "load_avg_1m": os.getloadavg()[0], **args}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({**meta, "results": results, "packing": packed}, indent=1))
    print(json.dumps(meta))
    print(table(results, packed))


if __name__ == "__main__":
    main()
