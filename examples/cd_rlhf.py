"""CD-RLHF on a CPU: the same PPO run with eta = 0 (plain PPO) and eta > 0 (curiosity), several seeds.

The task leaves room for diversity: the prompt asks for five words, and a rule reward pays +1 for each
"positive" word (15 of them) and -1 for a "negative" word (15) or anything else, averaged over the five
slots (a completion without exactly five words scores -1). 15^5 completions reach the maximum, so a policy
can be perfect and still diverse. The policy is a tiny Llama (random init, 2 layers, hidden 64) over a
word-level vocabulary (one token per word, so the run is cheap on a CPU), first fine-tuned on uniformly
random five-word lists (SFT warm start), then trained with PPO. Afterwards N completions per evaluation
prompt are sampled at temperature 1.0 and scored with the CD-RLHF diversity metrics and the reward
(PAPERS.md §2 protocol, at toy scale).

    python examples/cd_rlhf.py --out runs/cd_rlhf --seeds 0 1 2 --eta 0.1 --steps 40

writes RUN/results.json, RUN/table.md and RUN/cd_rlhf.png (add --docs DIR to copy the plot there).
`run_experiment(...)` is the same from Python (tests call it with a few steps).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

POSITIVE = ("good", "nice", "kind", "warm", "calm", "glad", "fair", "bold", "fun", "rich",
            "safe", "cool", "neat", "true", "wise")
NEGATIVE = ("bad", "sad", "cold", "dull", "grim", "weak", "sour", "dark", "poor", "rude",
            "lazy", "slow", "ugly", "mean", "vile")
PROMPTS = ("five words :", "say five words :", "words please :", "give me words :",
           "list five :", "your words :", "five more :", "some words :")
N_WORDS = 5
MAX_NEW_TOKENS = N_WORDS + 3  # one token per word, EOS, and room for a run-on
SPECIALS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


class WordSentimentReward:
    """TRL-style rule reward: mean over the five word slots of +1 (positive), -1 (negative or unknown);
    -1 when the completion does not hold exactly five words."""

    __name__ = "word_sentiment"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
        out = []
        for text in completions:
            words = text.split()
            if len(words) != N_WORDS:
                out.append(-1.0)
                continue
            out.append(sum(1.0 if w in POSITIVE else -1.0 for w in words) / N_WORDS)
        return out


def write_data(out_dir: Path, n_sft: int = 1500, n_rl: int = 256, seed: int = 0) -> dict[str, Path]:
    rng = random.Random(seed)
    vocab = POSITIVE + NEGATIVE
    out_dir.mkdir(parents=True, exist_ok=True)
    sft = [{"prompt": rng.choice(PROMPTS), "completion": " ".join(rng.choice(vocab) for _ in range(N_WORDS))}
           for _ in range(n_sft)]
    rl = [{"prompt": PROMPTS[i % len(PROMPTS)]} for i in range(n_rl)]
    paths = {"sft": out_dir / "sft.jsonl", "prompts": out_dir / "prompts.jsonl"}
    paths["sft"].write_text("".join(json.dumps(r) + "\n" for r in sft))
    paths["prompts"].write_text("".join(json.dumps(r) + "\n" for r in rl))
    return paths


def word_tokenizer():
    """A word-level `PreTrainedTokenizerFast` (one token per whitespace word) over the task's words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(SPECIALS.values()) + list(POSITIVE + NEGATIVE)
    words += sorted({w for p in PROMPTS for w in p.split()} - set(words))
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=SPECIALS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **SPECIALS)


def make_base_model(path: Path, seed: int = 0) -> Path:
    """A tiny random Llama (2 layers, hidden 64) over the word vocabulary, saved like a real checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from align.testing import tiny_config

    tokenizer = word_tokenizer()
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer), 64, 2, 4, 64, **ids))
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def warm_start(out: Path, data: dict[str, Path], sft_epochs: int = 2) -> Path:
    """The tiny word-level Llama fine-tuned on random five-word lists (align.supervised.sft); returns its directory."""
    from align.supervised import sft

    sft_dir = out / "sft-model"
    if (sft_dir / "config.json").is_file():
        return sft_dir
    base = make_base_model(out / "base-model")
    sft({"model": {"path": str(base)}, "data": {"path": str(data["sft"])},
         "train": {"epochs": sft_epochs, "batch_size": 64, "lr": 3e-3, "seed": 0, "device": "cpu"},
         "output_dir": str(sft_dir), "logging": {"name": "sft", "run_dir": str(out / "sft-log"), "progress": False}})
    return sft_dir


def ppo_config(model: Path, prompts: Path, run_dir: Path, seed: int, eta: float, steps: int,
               prompts_per_step: int, top_k: int = 1, lr: float = 7e-4) -> dict[str, Any]:
    """PPO with a value head and the KL penalty in the reward; curiosity on when eta > 0."""
    curiosity = {"eta": eta, "top_k": top_k, "lr": 1e-4} if eta > 0 else None
    return {
        "algorithm": "ppo",
        "model": {"path": str(model), "critic": "value_head"},
        "data": {"path": str(prompts)},
        "rollout": {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0},
        # clip(RM score, -2.5, 2.5) as CD-RLHF (a no-op here: the rule reward lies in [-1, 1])
        "reward": {"functions": [WordSentimentReward()], "curiosity": curiosity, "clip": 2.5},
        "algo": {"gamma": 1.0, "lam": 0.95, "kl_coef": 0.1, "kl_in": "reward", "value_clip": 0.2,
                 "vf_coef": 0.5, "whiten_advantages": True, "epochs": 1},
        "train": {"steps": steps, "prompts_per_step": prompts_per_step, "mini_batch_size": prompts_per_step // 2,
                  "micro_batch_size": prompts_per_step // 2, "lr": lr, "seed": seed, "device": "cpu"},
        "logging": {"name": run_dir.name, "run_dir": str(run_dir), "progress": False, "print_every": 0},
        "checkpoint": {"every": 0, "save_final": True},
    }


def evaluate(policy_dir: Path, n: int, seed: int, sentbert_model: Any = None) -> dict[str, float]:
    """N samples per evaluation prompt at temperature 1.0: diversity metrics and the mean reward."""
    from align.commands.diversity import load_model, sample_completions
    from align.diversity import diversity

    model, tokenizer = load_model(policy_dir, "cpu")
    groups = sample_completions(model, tokenizer, list(PROMPTS), n, temperature=1.0, top_p=1.0,
                                max_new_tokens=MAX_NEW_TOKENS, seed=10_000 + seed)
    metrics = diversity(groups, sentbert=sentbert_model is not None, sentbert_model=sentbert_model)
    flat = [c for g in groups for c in g]
    scores = WordSentimentReward()([""] * len(flat), flat)
    metrics["reward"] = sum(scores) / len(scores)
    metrics["max_reward_rate"] = sum(s == 1.0 for s in scores) / len(scores)
    metrics["example"] = groups[0][:3]
    return metrics


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_experiment(out: Path, seeds: Sequence[int], eta: float, steps: int, prompts_per_step: int = 16,
                   n_samples: int = 10, sentbert: bool = True, sft_epochs: int = 2, n_sft: int = 1500) -> dict[str, Any]:
    import align

    out = Path(out)
    data = write_data(out / "data", n_sft=n_sft)
    t0 = time.perf_counter()
    model = warm_start(out, data, sft_epochs)
    sft_s = time.perf_counter() - t0
    sentbert_model = None
    if sentbert:
        from align.diversity import load_sentbert

        sentbert_model = load_sentbert()
    runs = []
    base = evaluate(model, n_samples, 0, sentbert_model)
    for seed in seeds:
        for e in (0.0, eta):
            run_dir = out / f"eta{e:g}-seed{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            t1 = time.perf_counter()
            result = align.train(ppo_config(model, data["prompts"], run_dir, seed, e, steps, prompts_per_step))
            train_s = time.perf_counter() - t1
            metrics = evaluate(result.checkpoint / "policy", n_samples, seed, sentbert_model)
            hist = result.history
            runs.append({"eta": e, "seed": seed, "train_seconds": train_s, "eval": metrics,
                         "train_reward_last5": statistics.fmean(h["reward/mean"] for h in hist[-5:]),
                         "curve": [h["reward/mean"] for h in hist],
                         "gate_rate": statistics.fmean(h.get("curiosity/gate_rate", float("nan")) for h in hist),
                         "icm_loss_first_last": [hist[0].get("curiosity/icm_loss"), hist[-1].get("curiosity/icm_loss")]})
            print(f"eta={e:g} seed={seed}: reward {metrics['reward']:+.3f}  diversity {metrics['diversity']:.4f}  "
                  f"self_bleu {metrics['self_bleu']:.4f}  ({train_s:.0f} s)  e.g. {metrics['example']}", flush=True)
    results = {"seeds": list(seeds), "eta": eta, "steps": steps, "prompts_per_step": prompts_per_step,
               "n_samples": n_samples, "sft_seconds": sft_s, "sft_model": base, "runs": runs,
               "wall_seconds": time.perf_counter() - t0}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "table.md").write_text(format_table(results))
    plot(results, out / "cd_rlhf.png")
    return results


METRICS = (("reward", "higher"), ("diversity", "higher"), ("ead", "higher"), ("distinct_1", "higher"),
           ("distinct_2", "higher"), ("self_bleu", "lower"), ("sentbert", "lower"))


def format_table(results: dict[str, Any]) -> str:
    keys = [(k, d) for k, d in METRICS if k in results["runs"][0]["eval"]]
    head = "| setting | " + " | ".join(f"{k} ({d} = more {'reward' if k == 'reward' else 'diverse'})" for k, d in keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 1)]
    lines.append("| SFT start | " + " | ".join(f"{results['sft_model'][k]:.4f}" for k, _ in keys) + " |")
    for e in sorted({r["eta"] for r in results["runs"]}):
        rows = [r for r in results["runs"] if r["eta"] == e]
        cells = []
        for k, _ in keys:
            m, s = mean_std([r["eval"][k] for r in rows])
            cells.append(f"{m:.4f} ± {s:.4f}")
        label = "PPO (eta = 0)" if e == 0 else f"CD-RLHF (eta = {e:g})"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    etas = sorted({r["eta"] for r in results["runs"]})
    keys = [k for k, _ in METRICS if k in results["runs"][0]["eval"]]
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(3.0 * (len(keys) + 1), 3.2))
    colors = ["tab:gray", "tab:orange"]
    for ax, k in zip(axes, keys):
        for i, e in enumerate(etas):
            vals = [r["eval"][k] for r in results["runs"] if r["eta"] == e]
            m, s = mean_std(vals)
            ax.bar(i, m, yerr=s, color=colors[i % 2], capsize=4)
            ax.scatter([i] * len(vals), vals, color="black", s=10, zorder=3)
        ax.axhline(results["sft_model"][k], color="tab:blue", ls="--", lw=1, label="SFT start")
        ax.set_xticks(range(len(etas)), [f"eta={e:g}" for e in etas])
        ax.set_title(k)
    ax = axes[-1]
    for i, e in enumerate(etas):
        curves = [r["curve"] for r in results["runs"] if r["eta"] == e]
        mean_curve = [statistics.fmean(c[t] for c in curves) for t in range(min(map(len, curves)))]
        ax.plot(range(1, len(mean_curve) + 1), mean_curve, color=colors[i % 2], label=f"eta={e:g}")
    ax.set_title("train reward (mean over seeds)")
    ax.set_xlabel("PPO step")
    ax.legend(fontsize=7)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"CD-RLHF toy run: {len(results['seeds'])} seeds, {results['steps']} PPO steps, "
                 f"{results['n_samples']} samples/prompt at T=1 (bars: mean ± std, dots: seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/cd_rlhf")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eta", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--n", type=int, default=10, help="samples per evaluation prompt")
    parser.add_argument("--sft-epochs", type=int, default=2)
    parser.add_argument("--no-sentbert", action="store_true")
    parser.add_argument("--docs", default=None, help="copy the plot cd_rlhf.png into this directory")
    args = parser.parse_args(argv)
    if args.eta <= 0 or not math.isfinite(args.eta):
        parser.error("--eta must be > 0 (the eta = 0 run is always made)")
    results = run_experiment(Path(args.out), args.seeds, args.eta, args.steps, args.prompts_per_step, args.n,
                             not args.no_sentbert, args.sft_epochs)
    print(format_table(results))
    print(f"total {results['wall_seconds']:.0f} s (SFT {results['sft_seconds']:.0f} s)")
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(args.out) / "cd_rlhf.png", docs / "cd_rlhf.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
