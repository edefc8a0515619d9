"""Rollout throughput: our RolloutEngine vs Hugging Face `generate`, new tokens/s, side by side.

    python benchmarks/rollout.py                      # CPU: tiny (2 layers, hidden 64) and small (4 x 256) models
    python benchmarks/rollout.py --device cuda        # GPU: Qwen2-0.5B-shaped random model, bf16
    python benchmarks/rollout.py --device cuda --batch-sizes 16 64 256 --prompt-len 128 --new-tokens 256

Both sides sample the same way and both return text (--detokenize both, the default: HF's ids are decoded
as the engine decodes its own; F19 of GPU_READINESS.md): top-k 50 / top-p 0.9, every row generates exactly --new-tokens tokens
(HF: do_sample, min_new_tokens = max_new_tokens; ours: ignore_eos). Each shape is run once first (warm-up:
CUDA graph capture, Triton compilation, allocator) and timed on the following --repeats calls (median),
HF and ours interleaved so background load hits both alike; CUDA times come from CUDA events. On CPU the
process CPU time is reported too (the wall clock on a shared machine is noisy). With --check-logprobs the
engine's log-probs are compared with the trainer's recomputation (align.trainer.forward) in the model's
dtype. Prints a table last and writes JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch  # noqa: E402

from align.rollouts import RolloutEngine, SamplingParams  # noqa: E402

QWEN_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True)


def word_tokenizer(vocab_size: int):
    """A tokenizer whose vocabulary covers every id the model can sample (ids decode to "t<id> ")."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, **{f"t{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", padding_side="left")


def build_model(name: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    if name == "qwen2-0.5b":
        tok = word_tokenizer(QWEN_05B["vocab_size"])
        config = Qwen2Config(**QWEN_05B, pad_token_id=0, eos_token_id=1, bos_token_id=1)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        from align.testing import make_tiny_model

        hidden, layers = {"tiny": (64, 2), "small": (256, 4)}[name]
        path = make_tiny_model(Path(tempfile.mkdtemp()) / name, arch="qwen2", hidden_size=hidden, num_layers=layers,
                               max_position_embeddings=2048)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(path)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.to(device).eval(), tok


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) of fn()."""
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            c0 = time.process_time()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3, time.process_time() - c0
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - w0, time.process_time() - c0


def bench_shape(model, tok, batch: int, prompt_len: int, new_tokens: int, repeats: int, timer: Timer,
                check_logprobs: bool, detokenize: str = "both") -> dict:
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(batch)
    low = 2 if tok.vocab_size > 1000 else 4  # skip special tokens
    ids = torch.randint(low, len(tok), (batch, prompt_len), generator=gen)
    enc = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, top_k=50, top_p=0.9, ignore_eos=True)
    engine = RolloutEngine(model, tok, micro_batch_size=batch)
    prompts = ids.tolist()
    out = {}

    def hf():
        with torch.no_grad():
            ids_out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                                     top_k=50, top_p=0.9, pad_token_id=tok.pad_token_id)
        if detokenize == "both":
            # F19: the engine returns text (prompts and completions decoded), generate returns ids; decode here too
            # so both sides do the same work (the engine's decode_responses: response tokens, special tokens skipped)
            tok.batch_decode(prompts)
            tok.batch_decode(ids_out[:, prompt_len:].tolist(), skip_special_tokens=True)

    def ours():
        out["batch"] = engine.generate(prompts, params)

    first = {"hf": timer(hf)[0], "ours": timer(ours)[0]}
    assert int(out["batch"].mask.sum()) == batch * new_tokens, "every row must generate new_tokens tokens"
    runs: dict[str, list[tuple[float, float]]] = {"hf": [], "ours": []}
    for _ in range(repeats):
        runs["hf"].append(timer(hf))
        runs["ours"].append(timer(ours))
    tokens = batch * new_tokens
    row = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "first_call_s": first}
    for side, r in runs.items():
        wall = statistics.median(w for w, _ in r)
        cpu = statistics.median(c for _, c in r)
        row[side] = {"seconds": wall, "tokens_per_s": tokens / wall, "ms_per_step": wall / new_tokens * 1e3,
                     "cpu_seconds": cpu, "cpu_tokens_per_s": tokens / max(cpu, 1e-9), "runs": r}
    row["ratio"] = row["ours"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
    row["cpu_ratio"] = row["ours"]["cpu_tokens_per_s"] / row["hf"]["cpu_tokens_per_s"]
    if check_logprobs:
        from align.trainer.forward import response_forward

        b = out["batch"].to(device)
        with torch.no_grad():
            fwd = response_forward(model, b.input_ids, b.attention_mask, b.response_ids.shape[1])
        m = b.mask.bool()
        diff = (fwd.logprobs[m] - b.logprobs[m]).abs().float()
        row["logprob_diff"] = {"max": diff.max().item(), "mean": diff.mean().item(),
                               "p99": diff.quantile(0.99).item() if diff.numel() <= 2**24 else None}
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=None, help="tiny small (CPU default) | qwen2-0.5b (GPU default)")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--check-logprobs", action="store_true")
    ap.add_argument("--detokenize", choices=["both", "engine-only"], default="both",
                    help="both: HF's ids are decoded to text as the engine's are (a like-for-like comparison, F19); "
                         "engine-only: the earlier tables' setting (HF timed without detokenisation)")
    ap.add_argument("--out", default="benchmarks/results/rollout.json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    models = args.models or (["qwen2-0.5b"] if cuda else ["tiny", "small"])
    batch_sizes = args.batch_sizes or ([16, 64, 256] if cuda else [16, 64])
    prompt_len = args.prompt_len or (128 if cuda else 32)
    new_tokens = args.new_tokens or (256 if cuda else 64)
    dtype = torch.bfloat16 if cuda else torch.float32
    name = torch.cuda.get_device_name(device) if cuda else f"{platform.processor() or platform.machine()} CPU, " \
        f"{torch.get_num_threads()} torch threads"
    timer = Timer(device)
    rows = []
    for model_name in models:
        model, tok = build_model(model_name, device, dtype)
        for batch in batch_sizes:
            row = bench_shape(model, tok, batch, prompt_len, new_tokens, args.repeats, timer, args.check_logprobs,
                              args.detokenize)
            row["model"] = model_name
            rows.append(row)
            print(f"{model_name} B={batch}: ours {row['ours']['tokens_per_s']:.0f} tok/s, "
                  f"HF {row['hf']['tokens_per_s']:.0f} tok/s, x{row['ratio']:.2f}", flush=True)
        del model
    result = {"device": name, "device_type": device.type, "dtype": str(dtype).replace("torch.", ""),
              "torch": torch.__version__, "transformers": __import__("transformers").__version__,
              "sampling": "top-k 50, top-p 0.9, temperature 1", "repeats": args.repeats,
              "detokenize": {"both": "both sides decode prompts and completions to text",
                             "engine-only": "the engine decodes, HF generate does not"}[args.detokenize],
              "command": " ".join(["python", *sys.argv]), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    print(f"\nRollout throughput on {name} ({result['dtype']}; prompt {prompt_len}, {new_tokens} new tokens, "
          f"top-k 50 / top-p 0.9; median of {args.repeats} warm calls; detokenisation: {result['detokenize']})")
    head = f"{'model':<11} {'batch':>5} {'HF tok/s':>10} {'ours tok/s':>11} {'ratio':>6} {'HF ms/step':>11} " \
           f"{'ours ms/step':>13} {'cpu-time ratio':>15}"
    if args.check_logprobs:
        head += f" {'max |dlogp|':>12}"
    print(head)
    for r in rows:
        line = (f"{r['model']:<11} {r['batch']:>5} {r['hf']['tokens_per_s']:>10.0f} {r['ours']['tokens_per_s']:>11.0f} "
                f"{r['ratio']:>6.2f} {r['hf']['ms_per_step']:>11.2f} {r['ours']['ms_per_step']:>13.2f} "
                f"{r['cpu_ratio']:>15.2f}")
        if args.check_logprobs:
            line += f" {r['logprob_diff']['max']:>12.2e}"
        print(line)
    print(f"device: {name}; JSON: {out}")


if __name__ == "__main__":
    main()
