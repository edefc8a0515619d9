"""The training rows of the GPU suite (async k = 0 / 1, torchrun on one GPU): one job written once, run by the CLI.

    python benchmarks/train_rows.py prepare --mode gpu --work DIR     # model + prompts + DIR/config.yaml
    python -m align.cli train DIR/config.yaml --set train.max_staleness=1 --set logging.run_dir=DIR/runs/k1

`prepare` writes the job: a GRPO run on the arithmetic prompts (examples/arithmetic.py, ExactAnswer reward),
every completion forced to the full length (min_new_tokens = max_new_tokens) so steps compare like for like.
GPU: a random Qwen2-0.5B-shaped model (bf16, 151,936-entry tokenizer), 8 prompts x 8, 128 new tokens, top-k 50
/ top-p 0.9. Smoke (CPU): a tiny Llama, 2 prompts x 2, 4 new tokens. The rows run the real `align train`
(plain, or under `torchrun`); `summarize_run` reads the run's metrics.jsonl and the wall-clock times at which
the suite saw each step's line appear (the trainer logs a line per step; a timestamp is not part of it).

Learning is not measured here: bf16 weights at lr 1e-6 round every update away (the bf16 ulp is ~4e-3
relative, the update ~1e-6), so the reward stays flat (F20 of GPU_READINESS.md). Speed is what these rows read.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
F20_NOTE = ("speed only: pure-bf16 weights at lr 1e-6 round every update away (F20), so the reward does not "
            "learn; read learning from the CPU parity run or a run with fp32 master weights")

# substrings of the metric names that the async work logs (staleness histogram, queue depth, idle times)
ASYNC_KEYS = ("stale", "queue", "idle", "version", "async")


def job_config(mode: str, work: Path, model_dir: Path, prompts: Path) -> dict:
    gpu = mode == "gpu"
    new = 128 if gpu else 4
    return {
        "algorithm": "grpo",
        "model": {"path": str(model_dir), "dtype": "bfloat16" if gpu else "float32"},
        "data": {"path": str(prompts)},
        "rollout": {"max_new_tokens": new, "min_new_tokens": new, "temperature": 1.0, "top_k": 50 if gpu else 0,
                    "top_p": 0.9 if gpu else 1.0, "micro_batch_size": 64},
        "reward": {"functions": ["examples.arithmetic:exact_answer"]},
        "algo": {"group_size": 8 if gpu else 2, "kl_coef": 0.0},
        "train": {"steps": 8 if gpu else 3, "prompts_per_step": 8 if gpu else 2, "micro_batch_size": 16 if gpu else 4,
                  "lr": 1e-6 if gpu else 1e-4, "device": "cuda" if gpu else "cpu", "seed": 0},
        "logging": {"run_dir": str(work / "runs" / "default"), "progress": False, "print_every": 1},
        "checkpoint": {"every": 0, "save_final": False, "overwrite": True},
    }


def prepare(mode: str, work: Path) -> dict:
    sys.path.insert(0, str(ROOT / "examples"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from arithmetic import write_arithmetic_data

    work.mkdir(parents=True, exist_ok=True)
    prompts = write_arithmetic_data(work / "data", n_rl=256, n_sft=8, seed=0)["prompts"]
    if mode == "gpu":
        from e2e_vs_trl import make_qwen2_05b_shape

        model_dir = make_qwen2_05b_shape(work / "model", seed=0)
    else:
        from align.testing import make_tiny_model

        model_dir = make_tiny_model(work / "model", arch="llama", hidden_size=32, num_layers=1, num_heads=2, seed=0)
    config = job_config(mode, work, model_dir, prompts)
    import yaml

    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return {"config": str(path), "model": str(model_dir), "prompts": str(prompts), "job": config}


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize_run(run_dir: Path, seen_at: list[float], steps_expected: int) -> dict:
    """What a training row reports: steps/s over the warm steps (the first is warm-up: compilation, CUDA-graph
    capture), from the times the suite saw each metrics line; per-phase medians of the trainer's `time/*`
    metrics over warm steps; the async metrics (staleness, queue, idle) when the run logs them."""
    rows = read_metrics(run_dir)
    out: dict = {"steps_logged": len(rows), "steps_expected": steps_expected, "run_dir": str(run_dir)}
    if not rows:
        return out
    warm = rows[1:] or rows
    keys = [k for k in rows[0] if k.startswith("time/")]
    out["phases_s"] = {k: statistics.median(r[k] for r in warm if r.get(k) is not None) for k in keys
                       if any(r.get(k) is not None for r in warm)}
    # lines seen in the same poll share a time stamp: a zero span measures nothing (no rate is reported)
    if len(seen_at) >= 3 and seen_at[-1] > seen_at[1]:
        gaps = [b - a for a, b in zip(seen_at[1:-1], seen_at[2:])]  # warm steps only
        out["step_wall_s_median"] = statistics.median(gaps)
        out["steps_per_s"] = (len(seen_at) - 2) / (seen_at[-1] - seen_at[1])
        out["steps_per_s_source"] = "metrics lines seen"
    elif out["phases_s"].get("time/step"):  # lines flushed together (tiny steps): the trainer's own step time
        out["steps_per_s"] = 1.0 / out["phases_s"]["time/step"]
        out["steps_per_s_source"] = "median time/step"
    out["step_wall_seen_s"] = [round(b - a, 4) for a, b in zip(seen_at, seen_at[1:])]
    out["reward_mean"] = statistics.mean(r.get("reward/mean") or 0.0 for r in rows)
    async_keys = sorted({k for r in rows for k in r if any(s in k for s in ASYNC_KEYS)})
    out["async_metrics"] = {k: [r.get(k) for r in rows] for k in async_keys}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="write the model, prompts and config.yaml of the training rows")
    p.add_argument("--mode", choices=["gpu", "smoke"], required=True)
    p.add_argument("--work", required=True)
    args = ap.parse_args(argv)
    info = prepare(args.mode, Path(args.work))
    print(json.dumps({k: v for k, v in info.items() if k != "job"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
