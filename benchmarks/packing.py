"""Sequence packing and token-budget micro-batches: training tokens/s of the trainer's forward + backward on a
batch of mixed lengths, with and without packing, with fixed micro-batches and with a token budget.

    python benchmarks/packing.py                          # CPU, 1 thread, a small random Llama
    python benchmarks/packing.py --device cuda --hidden 1024 --layers 8 --n 64 --max-tokens 16384

One pass = every micro-batch of the batch through `align.trainer.forward.response_forward` (log-probs and
entropy of the response tokens, through the model or its packed view) and a backward of a token-mean loss,
the shape of the trainer's update. tokens/s counts real tokens (prompt + response, no padding) per second of
the pass, so the modes are compared on the same work; "processed" is what the forward actually ran (padded
rows for the unpacked modes, packed rows for the packed ones). Each mode also reports its largest log-prob
difference from the unpacked fixed mode (float rounding, ~1e-6 in fp32). Median of `repeats` passes after a
warm-up. On CPU the packed mask path is a correctness path: its gain is only the padding it drops, and the
explicit [R, 1, C, C] mask costs time; the varlen (flash-attention) path is the GPU one.

`run(...) -> dict` is what `benchmarks/sharding.py` calls for its packing rows. Prints a table last and
writes JSON (--out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from align.trainer.forward import response_forward
from align.trainer.micro_batches import micro_batches
from align.trainer.packing import maybe_packed, pack, uses_varlen


def mixed_batch(n: int, max_prompt: int, max_response: int, vocab: int, seed: int = 0):
    """[n, P + T] ids and attention mask laid out as the rollout engine does (left-padded prompts, right-padded
    responses), lengths drawn so most responses are short and a few long (as EOS-stopped RL batches are)."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(max_prompt // 4, max_prompt + 1, (n,), generator=g)
    # a long tail: squares of uniforms put ~half the responses under a quarter of the maximum
    response_lens = (torch.rand(n, generator=g).square() * (max_response - 1)).long() + 1
    response_lens[0] = max_response  # one truncated row, so the padded width is the maximum
    ids = torch.zeros(n, max_prompt + max_response, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, (p, r) in enumerate(zip(prompt_lens.tolist(), response_lens.tolist())):
        ids[i, max_prompt - p:max_prompt + r] = torch.randint(3, vocab, (p + r,), generator=g)
        att[i, max_prompt - p:max_prompt + r] = 1
    mask = att[:, max_prompt:].clone()
    return ids, att, mask


def tiny_llama(hidden: int, layers: int, vocab: int, device: str, dtype: torch.dtype, attn: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 4 // 1, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                      max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype).to(device)


def one_pass(model, ids, att, mask, micro_batch_size: int, max_tokens: int, pack_sequences: bool):
    """Forward + backward over the batch's micro-batches; -> (per-token log-probs [N, T], tokens processed)."""
    t = mask.shape[1]
    total = mask.sum().clamp(min=1)
    rows = torch.arange(ids.shape[0], device=ids.device)
    out = torch.zeros(mask.shape, device=ids.device)
    processed = 0
    for micro in micro_batches(rows, att, micro_batch_size, max_tokens, pack_sequences):
        m_ids, m_att = ids[micro], att[micro]
        fwd = response_forward(maybe_packed(model, pack_sequences), m_ids, m_att, t, with_entropy=True)
        loss = -(fwd.logprobs * mask[micro]).sum() / total + 1e-3 * (fwd.entropy * mask[micro]).sum() / total
        loss.backward()
        out[micro] = fwd.logprobs.detach()
        if pack_sequences:
            processed += pack(m_ids, m_att, varlen=uses_varlen(model)).input_ids.numel()
        else:
            processed += m_ids.numel()
    return out, processed


def run(*, n: int = 32, max_prompt: int = 48, max_response: int = 160, hidden: int = 256, layers: int = 4,
        vocab: int = 2048, micro_batch_size: int = 8, max_tokens: int = 1024, repeats: int = 3,
        device: str = "cpu", dtype: str = "float32", attn: str = "sdpa", threads: int = 1, seed: int = 0) -> dict:
    """Tokens/s of the four modes (unpacked / packed x fixed micro-batches / token budget) -> a dict with
    `rows` (one per mode) and the set-up; see the module docstring."""
    if device == "cpu":
        torch.set_num_threads(threads)
    torch_dtype = getattr(torch, dtype)
    model = tiny_llama(hidden, layers, vocab, device, torch_dtype, attn).train()
    ids, att, mask = (x.to(device) for x in mixed_batch(n, max_prompt, max_response, vocab, seed))
    real = int(att.sum())
    modes = [("unpacked, fixed", False, 0), ("packed, fixed", True, 0),
             ("unpacked, budget", False, max_tokens), ("packed, budget", True, max_tokens)]
    rows, baseline = [], None
    for name, pack_on, budget in modes:
        times = []
        for i in range(repeats + 1):  # the first pass warms up
            model.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            logp, processed = one_pass(model, ids, att, mask, micro_batch_size, budget, pack_on)
            if device == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
        baseline = logp if baseline is None else baseline
        diff = float(((logp - baseline) * mask).abs().max())
        median = statistics.median(times)
        rows.append({"mode": name, "pack_sequences": pack_on, "max_tokens_per_micro_batch": budget,
                     "micro_batches": len(micro_batches(torch.arange(n, device=ids.device), att, micro_batch_size,
                                                        budget, pack_on)),
                     "s_per_pass": median, "tokens_per_s": real / median, "tokens_processed": processed,
                     "padding_frac": 1.0 - real / processed, "max_logprob_diff": diff})
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / base
    return {"bench": "packing", "device": device, "dtype": dtype, "attn": attn, "threads": threads, "n": n,
            "max_prompt": max_prompt, "max_response": max_response, "hidden": hidden, "layers": layers,
            "vocab": vocab, "micro_batch_size": micro_batch_size, "max_tokens": max_tokens, "repeats": repeats,
            "real_tokens": real, "padded_tokens": int(att.numel()), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "torch": torch.__version__, "rows": rows}


def table(result: dict) -> str:
    head = f"{'mode':<18}{'micro-batches':>14}{'processed':>11}{'padding':>9}{'s/pass':>9}{'tokens/s':>10}{'x':>7}{'max |dlogp|':>13}"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(f"{r['mode']:<18}{r['micro_batches']:>14}{r['tokens_processed']:>11}{r['padding_frac']:>9.0%}"
                     f"{r['s_per_pass']:>9.3f}{r['tokens_per_s']:>10.0f}{r['speedup']:>7.2f}{r['max_logprob_diff']:>13.1e}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--attn", default="sdpa", help="sdpa | eager | flash_attention_2 (GPU: the varlen path)")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--max-prompt", type=int, default=48)
    ap.add_argument("--max-response", type=int, default=160)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    result = run(n=a.n, max_prompt=a.max_prompt, max_response=a.max_response, hidden=a.hidden, layers=a.layers,
                 micro_batch_size=a.micro_batch_size, max_tokens=a.max_tokens, repeats=a.repeats, device=a.device,
                 dtype=a.dtype, attn=a.attn, threads=a.threads)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2))
    print(f"{result['device']} {result['dtype']} {result['attn']}, {result['threads']} thread(s), load {result['load_avg_1m']:.1f}; "
          f"{result['n']} rows, {result['real_tokens']} real of {result['padded_tokens']} padded tokens")
    print(table(result))


if __name__ == "__main__":
    main()
