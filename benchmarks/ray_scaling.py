"""Ray backend scaling: rollout samples/s with 1 vs 2 rollout workers (and the in-process engine beside them),
and the time pipelining saves by scoring shard k while shard k+1 generates.

    python benchmarks/ray_scaling.py                    # default: tiny llama, 64 samples x 32 tokens, 3 reps
    python benchmarks/ray_scaling.py --smoke            # 1 rep, small batch (a quick check)

Every configuration runs the same prompts with the same sample ids (so the same tokens are drawn: every
completion is forced to `--tokens` tokens), after one untimed warm-up call. Rows:
- generate: `backend.generate` only (samples/s); `local` is the in-process engine (one process, torch's own
  threads), `ray xN` are N rollout actors with 1 CPU each.
- generate+score: one step's generate then score with a reward that costs `--reward-ms` per sample (an
  I/O-bound reward: a remote RM or a sandboxed tool call), pipeline off vs on (2 rollout workers, 2 reward
  workers). The overlap gain is (off - on) / off.
Prints a table last and writes JSON (--out). Figures depend heavily on the machine's free cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_config(model: Path, data: Path, backend: str, workers: int, pipeline: bool, args) -> dict:
    from align.testing import SlowReward  # imported late: the script pins threads before torch loads

    return {
        "algorithm": "grpo",
        "model": {"path": str(model)},
        "data": {"path": str(data)},
        "reward": {"functions": [SlowReward(args.reward_ms)]},
        "rollout": {"max_new_tokens": args.tokens, "micro_batch_size": args.micro_batch},
        "algo": {"group_size": 4},
        "train": {"steps": 1, "prompts_per_step": args.samples // 4, "seed": 0, "device": "cpu"},
        "cluster": {"backend": backend, "num_rollout_workers": workers, "num_reward_workers": 2, "keep_workers": True,
                    "pipeline": pipeline, "rollout_num_cpus": 1, "reward_num_cpus": 0.5},
        "logging": {"run_dir": str(model.parent / "runs"), "progress": False, "print_every": 0},
        "checkpoint": {"save_final": False},
    }


def measure(cfg: dict, args, with_score: bool) -> list[float]:
    import torch

    import align
    from align.rollouts.params import SamplingParams

    trainer = align.Trainer(cfg)
    try:
        params = SamplingParams(**{**trainer.params.__dict__, "min_new_tokens": args.tokens})
        prompts = [f"{i % 10}+{i % 7}=" for i in range(args.samples)]
        columns = {"answer": [str(i % 10 + i % 7) for i in range(args.samples)]}
        times = []
        for rep in range(args.reps + 1):  # the first call warms up
            ids = torch.arange(rep * args.samples, (rep + 1) * args.samples)
            t0 = time.perf_counter()
            batch = trainer.backend.generate(prompts, columns, ids, params)
            if with_score:
                out = trainer.backend.score(batch)
                assert all(e is None for e in out.errors), out.errors
            if rep:
                times.append(time.perf_counter() - t0)
        return times
    finally:
        trainer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--micro-batch", type=int, default=16, help="rollout.micro_batch_size (= a pipelined shard)")
    ap.add_argument("--reward-ms", type=float, default=20.0, help="reward cost per sample (ms)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ray_scaling.json"))
    args = ap.parse_args()
    if args.smoke:
        args.samples, args.tokens, args.reps, args.micro_batch = 16, 8, 1, 4

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    from ray import cloudpickle

    import align.backends.ray as ray_backend
    from align.testing import make_tiny_model

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    tmp = Path(tempfile.mkdtemp(prefix="ray_scaling_"))
    model = make_tiny_model(tmp / "model", hidden_size=args.hidden)
    data = tmp / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(64)))
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
    rows = []
    try:
        for name, backend, workers in (("local", "local", 1), ("ray x1", "ray", 1), ("ray x2", "ray", 2)):
            t = measure(make_config(model, data, backend, workers, False, args), args, with_score=False)
            rows.append({"case": f"generate {name}", "seconds": statistics.median(t),
                         "samples_per_s": args.samples / statistics.median(t), "times": t})
        for pipeline in (False, True):
            t = measure(make_config(model, data, "ray", 2, pipeline, args), args, with_score=True)
            rows.append({"case": f"generate+score ray x2, pipeline {'on' if pipeline else 'off'}",
                         "seconds": statistics.median(t), "samples_per_s": args.samples / statistics.median(t), "times": t})
    finally:
        ray_backend.release_parked_workers()
        ray.shutdown()
    by = {r["case"]: r for r in rows}
    scaling = by["generate ray x2"]["samples_per_s"] / by["generate ray x1"]["samples_per_s"]
    off = by["generate+score ray x2, pipeline off"]["seconds"]
    on = by["generate+score ray x2, pipeline on"]["seconds"]
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU used", "args": vars(args), "rows": rows,
              "scaling_x2_over_x1": scaling, "pipeline_gain": (off - on) / off,
              "command": "python benchmarks/ray_scaling.py" + (" --smoke" if args.smoke else "")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{args.samples} samples x {args.tokens} tokens, reward {args.reward_ms:g} ms/sample, {result['machine']}")
    print(f"{'case':42s} {'median s':>9s} {'samples/s':>10s}")
    for r in rows:
        print(f"{r['case']:42s} {r['seconds']:9.3f} {r['samples_per_s']:10.1f}")
    print(f"2 vs 1 rollout workers: x{scaling:.2f}   pipelining saves {100 * result['pipeline_gain']:.1f}% of generate+score")


if __name__ == "__main__":
    main()
