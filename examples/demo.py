"""The CPU demo (`make demo`): the usual RLHF pipeline on a task small enough for a laptop.

1. build a tiny random Llama-style model and a character tokenizer on disk (no downloads);
2. supervised warm start (`align.sft`) on a little arithmetic ("3+4=" -> "7"), so the policy knows the format;
3. GRPO (`align.train`) with the built-in `math_verify` reward (exact answer) on held-out prompts;
4. print the reward rising and write the curve PNG.

Runs in a few minutes on 2 cores: `python examples/demo.py [--steps 40] [--out runs/demo]`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from arithmetic import write_arithmetic_data  # noqa: E402

import align  # noqa: E402
from align.metrics import plot_run  # noqa: E402
from align.testing import make_tiny_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--steps", type=int, default=250, help="GRPO steps")
    ap.add_argument("--sft-steps", type=int, default=60, help="a short warm start: it learns the format, not the sums")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3, help="GRPO learning rate")
    ap.add_argument("--prompts-per-step", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=10, help="GRPO learning-rate warm-up steps")
    ap.add_argument("--max-staleness", type=int, default=0, help="train.max_staleness (docs/async.md)")
    ap.add_argument("--rollout-correction", default="none", help="algo.rollout_correction.mode (docs/async.md)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()

    data = write_arithmetic_data(out / "data", n_rl=400, n_sft=2000, seed=args.seed)
    base = make_tiny_model(out / "tiny-model", arch="llama", hidden_size=96, num_layers=2, num_heads=4, seed=args.seed)
    print(f"[1/3] tiny model at {base}; data at {data['prompts'].parent}", flush=True)

    sft = align.sft({
        "model": {"path": str(base)},
        "data": {"path": str(data["sft"])},
        "train": {"max_steps": args.sft_steps, "batch_size": 64, "lr": 3e-3, "warmup_steps": 10, "seed": args.seed},
        "output_dir": str(out / "sft-model"),
        "logging": {"print_every": 40},
    })
    print(f"[2/3] SFT warm start: {sft['steps']} steps, final loss {sft['sft/loss']:.3f}", flush=True)

    result = align.train({
        "algorithm": "grpo",
        "model": {"path": sft["output_dir"]},
        "data": {"path": str(data["prompts"])},
        "rollout": {"max_new_tokens": 3, "temperature": 1.0},
        "reward": {"functions": [{"name": "math_verify", "kwargs": {"last_number": True}}]},
        "algo": {"group_size": 8, "clip_high": 0.28, "kl_coef": 0.0,
                 "rollout_correction": {"mode": args.rollout_correction}},
        "train": {"steps": args.steps, "prompts_per_step": args.prompts_per_step, "micro_batch_size": 128, "lr": args.lr,
                  "warmup_steps": args.warmup, "lr_scheduler": "cosine", "seed": args.seed,
                  "max_staleness": args.max_staleness},
        "logging": {"run_dir": str(out / "grpo"), "progress": False, "print_every": 5},
        "checkpoint": {"every": 0, "overwrite": True},  # `make demo` rebuilds everything: replace the last run
    })
    rewards = [h["reward/mean"] for h in result.history]
    k = max(1, min(10, len(rewards) // 4))
    start, end = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    png = plot_run(result.run_dir)
    print(f"[3/3] GRPO: {len(rewards)} steps in {time.perf_counter() - t0:.0f}s total; curves: {png}")
    print(f"reward (exact-answer accuracy, mean of {k} steps): start {start:.3f} -> end {end:.3f}")
    return 0 if end > start else 1


if __name__ == "__main__":
    sys.exit(main())
