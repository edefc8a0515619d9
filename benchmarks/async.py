"""Bounded staleness on CPU with Ray: the step time of k = 0 (synchronous) and k = 1 (generation and scoring of
the next step overlap this step's training), in one run, against the overlap bound.

    python benchmarks/async.py            # 2 rollout workers, reward 20 ms/sample, 1 thread per process
    python benchmarks/async.py --smoke    # a short check (2 measured steps)

The bound: a synchronous step costs S = (generate + score) + train, with train = logprobs + advantages +
update + sync (the weight push; at k = 1 on Ray it includes waiting for the generation in flight, counted as
trainer idle time); at best an overlapped step costs max(generate + score, train), so the speed-up
k = 1 can reach is S / max(generate + score, train), all measured at k = 0 (means over the measured steps,
warm-up steps excluded). Reported: bound, reached = S / step time at k = 1, and reached / bound (target >= 0.8).
Also reported: the share of the possible gain, (speed-up - 1) / (bound - 1), the stricter reading when the
bound is small. The 1-minute load average is printed with the figures: on a shared machine they are noisy (the overlap needs a
free core for the rollout workers while the trainer trains). Writes JSON (--out).
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
TRAIN_PHASES = ("time/logprobs", "time/advantages", "time/update", "time/sync")


def make_config(model: Path, data: Path, k: int, args) -> dict:
    from align.testing import SlowReward  # imported late: the script pins threads before torch loads

    return {
        "algorithm": "grpo",
        "model": {"path": str(model)},
        "data": {"path": str(data)},
        "reward": {"functions": [SlowReward(args.reward_ms)]},
        "rollout": {"max_new_tokens": args.tokens, "min_new_tokens": args.tokens, "micro_batch_size": args.micro_batch},
        "algo": {"group_size": 4, "epochs": args.epochs},
        "train": {"steps": args.warmup + args.steps, "prompts_per_step": args.samples // 4, "seed": 0, "device": "cpu",
                  "micro_batch_size": args.train_micro_batch, "lr": 1e-4, "max_staleness": k},
        "cluster": {"backend": "ray", "num_rollout_workers": 2, "num_reward_workers": 2, "keep_workers": True,
                    "rollout_num_cpus": 1, "reward_num_cpus": 0.5},
        "logging": {"run_dir": str(model.parent / f"runs-k{k}"), "progress": False, "print_every": 0},
        "checkpoint": {"save_final": False, "overwrite": True},
    }


def run(cfg: dict, warmup: int) -> list[dict[str, float]]:
    import align

    trainer = align.Trainer(cfg)
    try:
        return trainer.train().history[warmup:]
    finally:
        trainer.close()


def mean(hist, key):
    return statistics.fmean(h.get(key, 0.0) for h in hist)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32, help="samples per step (prompts x group of 4)")
    ap.add_argument("--tokens", type=int, default=24, help="new tokens per sample (forced: min_new_tokens)")
    ap.add_argument("--micro-batch", type=int, default=8, help="rollout.micro_batch_size")
    ap.add_argument("--train-micro-batch", type=int, default=4, help="train.micro_batch_size")
    ap.add_argument("--epochs", type=int, default=3, help="algo.epochs (sets the training half's weight)")
    ap.add_argument("--reward-ms", type=float, default=20.0, help="reward cost per sample (ms)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6, help="measured steps per k")
    ap.add_argument("--warmup", type=int, default=2, help="steps excluded from the means")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "async_cpu.json"))
    args = ap.parse_args(argv)
    if args.smoke:
        args.samples, args.tokens, args.steps, args.warmup = 8, 6, 2, 1

    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    import torch
    from ray import cloudpickle

    import align.backends.ray as ray_backend
    from align.testing import make_tiny_model

    torch.set_num_threads(1)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    tmp = Path(tempfile.mkdtemp(prefix="async_bench_"))
    model = make_tiny_model(tmp / "model", hidden_size=args.hidden, num_layers=args.layers)
    data = tmp / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i % 7}=", "answer": str(i + i % 7)}) + "\n" for i in range(256)))
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        sync = run(make_config(model, data, 0, args), args.warmup)
        k1 = run(make_config(model, data, 1, args), args.warmup)
    finally:
        ray_backend.release_parked_workers()
        ray.shutdown()
    gen_score = mean(sync, "time/generate") + mean(sync, "time/score")
    train = sum(mean(sync, k) for k in TRAIN_PHASES)
    s_step, k1_step = mean(sync, "time/step"), mean(k1, "time/step")
    bound = s_step / max(gen_score, train)
    reached = s_step / k1_step
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU used", "args": vars(args),
        "load_avg_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "k0": {"step_s": s_step, "generate_plus_score_s": gen_score, "train_s": train,
               **{k: mean(sync, k) for k in ("time/generate", "time/score", *TRAIN_PHASES)}},
        "k1": {"step_s": k1_step, "trainer_idle_s": mean(k1, "async/trainer_idle_s") + mean(k1, "async/sync_wait_s"),
               "generator_idle_s": mean(k1, "async/generator_idle_s"), "generate_s": mean(k1, "async/generate_s"),
               "score_s": mean(k1, "async/score_s"), "staleness_mean": mean(k1, "async/staleness_mean"),
               "train_s": sum(mean(k1, k) for k in TRAIN_PHASES) - mean(k1, "async/sync_wait_s")},
        "overlap_bound": bound, "speedup_k1": reached, "share_of_bound": reached / bound,
        "share_of_gain": (reached - 1) / (bound - 1) if bound > 1 else float("nan"),
        "seconds_total": time.perf_counter() - t0,
        "command": "python benchmarks/async.py" + (" --smoke" if args.smoke else ""),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{args.samples} samples x {args.tokens} tokens/step, reward {args.reward_ms:g} ms/sample, 2 rollout workers; "
          f"{result['machine']}; 1-min load {load_before:.2f} -> {result['load_avg_1min']['after']:.2f}")
    print(f"k=0: step {s_step:.3f}s = generate+score {gen_score:.3f}s + train {train:.3f}s")
    print(f"k=1: step {k1_step:.3f}s (trainer idle {result['k1']['trainer_idle_s']:.3f}s, "
          f"generate {result['k1']['generate_s']:.3f}s, score {result['k1']['score_s']:.3f}s, "
          f"train {result['k1']['train_s']:.3f}s)")
    print(f"overlap bound S / max(generate+score, train) = x{bound:.2f}; k=1 reaches x{reached:.2f} "
          f"= {100 * reached / bound:.0f}% of the bound (target >= 80%); "
          f"{100 * result['share_of_gain']:.0f}% of the possible gain (speed-up - 1) / (bound - 1)")
    print(json.dumps({k: result[k] for k in ("overlap_bound", "speedup_k1", "share_of_bound", "share_of_gain",
                                             "load_avg_1min")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
