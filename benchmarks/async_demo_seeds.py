"""The demo task (`make demo`'s config) at train.max_staleness k = 1 vs k = 0 over seeds: non-inferiority of the
final exact-answer accuracy with margin 0.05 (the paired 95% t-interval of k1 - k0 must lie above -0.05).

    python benchmarks/async_demo_seeds.py                      # 5 seeds x 2 runs of examples/demo.py
    python benchmarks/async_demo_seeds.py --seeds 0 1 --steps 60 --out /tmp/x.json   # a shorter look

Each run is `examples/demo.py --seed S --max-staleness K` (tiny model, SFT warm start, GRPO); its accuracy is the
demo's "end" figure: the mean reward (math_verify, exact answer) of the last min(10, steps // 4) steps. The two
runs of a seed share the SFT warm start (same seed, same data), so the pair differs only by k. Writes JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def final_accuracy(run_dir: Path) -> float:
    rewards = [json.loads(x)["reward/mean"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    k = max(1, min(10, len(rewards) // 4))
    return sum(rewards[-k:]) / k


def paired_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two-sided t-interval of paired differences (n - 1 degrees of freedom)."""
    from scipy.stats import t

    n = len(diffs)
    m = statistics.fmean(diffs)
    if n < 2:
        return m, -math.inf, math.inf
    half = float(t.ppf(0.5 + level / 2, n - 1)) * statistics.stdev(diffs) / math.sqrt(n)
    return m, m - half, m + half


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=250, help="GRPO steps (the demo's default)")
    ap.add_argument("--margin", type=float, default=0.05)
    ap.add_argument("--correction", default="none", help="algo.rollout_correction.mode of the k = 1 runs")
    ap.add_argument("--reuse-k0", default=None, help="a previous run's JSON: take the k = 0 accuracies from it")
    ap.add_argument("--work", default=str(ROOT / "runs" / "async_demo_seeds"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "async_demo_seeds.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import demo
    import torch

    torch.set_num_threads(1)
    reused = {}
    if args.reuse_k0:
        old = json.loads(Path(args.reuse_k0).read_text())
        if old["steps"] != args.steps:
            raise SystemExit(f"--reuse-k0 {args.reuse_k0}: it ran {old['steps']} steps, this run {args.steps}")
        reused = {r["seed"]: r["k0"] for r in old["rows"]}
    rows, t0 = [], time.perf_counter()
    for seed in args.seeds:
        acc = {}
        for k in (0, 1):
            if k == 0 and seed in reused:
                acc[0] = reused[seed]
                continue
            out = Path(args.work) / f"seed{seed}-k{k}-{args.correction if k else 'none'}"
            demo.main(["--seed", str(seed), "--steps", str(args.steps), "--out", str(out), "--max-staleness", str(k),
                       "--rollout-correction", args.correction if k else "none"])
            acc[k] = final_accuracy(out / "grpo")
        rows.append({"seed": seed, "k0": acc[0], "k1": acc[1], "diff": acc[1] - acc[0]})
        print(f"seed {seed}: k=0 {acc[0]:.3f}  k=1 {acc[1]:.3f}  diff {acc[1] - acc[0]:+.3f}", flush=True)
    mean, lo, hi = paired_interval([r["diff"] for r in rows])
    result = {"rows": rows, "k1_correction": args.correction, "k0_reused_from": args.reuse_k0, "mean_diff": mean, "ci95": [lo, hi], "margin": args.margin,
              "non_inferior": bool(lo > -args.margin), "steps": args.steps, "seconds": time.perf_counter() - t0,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "load_avg_1min": os.getloadavg()[0],
              "command": "python benchmarks/async_demo_seeds.py " + " ".join(argv or sys.argv[1:])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"k1 - k0: mean {mean:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}]; non-inferior at margin {args.margin}: "
          f"{result['non_inferior']}")
    print(json.dumps({k: result[k] for k in ("mean_diff", "ci95", "non_inferior")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
