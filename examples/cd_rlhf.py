"""CD-RLHF on a CPU: PPO with curiosity at eta in {0, 0.02, 0.05, 0.1, 0.2}, several seeds, paired by seed.

The task (examples/cd_rlhf_task.py): five made-up words of 3-4 word pieces each; a rule reward pays +0.4
per allowed word (24 of them) and +0.5 per favourite (4 of the 24), so many answers are near-optimal and a
policy gains a little by collapsing onto the favourites. Each seed builds its own tiny Llama, fine-tunes it on
uniformly random five-word lists (SFT warm start), then runs PPO once per eta from that SFT model with the
same seed. Every checkpoint is evaluated on 24 prompts x 10 samples at temperature 1.0 with the CD-RLHF
diversity metrics (released counting, `align.diversity`) and the reward.

    python examples/cd_rlhf.py --out runs/cd_rlhf --docs docs/experiments          # the full experiment
    python examples/cd_rlhf.py --out X --seeds 0 1 --steps 3 --prompts-per-step 4 --n 3 --sft-epochs 1 --no-sentbert

writes OUT/results.json, OUT/table.md and OUT/cd_rlhf.png (matplotlib; skipped with a message without it).
`--jobs 2` runs two single-threaded processes at once. `run_experiment(...)` is the same from Python.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the task and report modules sit next to this file

import cd_rlhf_report as report  # noqa: E402
import cd_rlhf_task as task  # noqa: E402

ETAS = (0.0, 0.02, 0.05, 0.1, 0.2)
MAX_NEW_TOKENS = task.N_WORDS * 4 + 2  # five words of up to 4 pieces, EOS, one spare
EVAL_REPEATS = 3  # each of the 8 prompt phrasings 3 times: 24 prompts x n samples


def _one_thread() -> None:
    # two processes share the 2 cores: one torch thread each (threads x processes <= cores)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


def make_base_model(path: Path, seed: int) -> Path:
    """A tiny random Llama (2 layers, hidden 64) over the word-piece vocabulary, saved like a checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from align.testing import tiny_config

    tokenizer = task.piece_tokenizer()
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer), 64, 2, 4, 64, **ids))
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def warm_start(out: Path, seed: int, sft_epochs: int, n_sft: int) -> dict[str, Any]:
    """Seed-specific SFT: base-model init, SFT data and SFT shuffling all follow `seed`."""
    _one_thread()
    from align.supervised import sft

    root = out / f"seed{seed}"
    data = task.write_data(root / "data", seed=seed, n_sft=n_sft)
    sft_dir = root / "sft-model"
    t0 = time.perf_counter()
    if not (sft_dir / "config.json").is_file():
        base = make_base_model(root / "base-model", seed)
        sft({"model": {"path": str(base)}, "data": {"path": str(data["sft"])},
             "train": {"epochs": sft_epochs, "batch_size": 64, "lr": 3e-3, "seed": seed, "device": "cpu"},
             "output_dir": str(sft_dir), "logging": {"name": "sft", "run_dir": str(root / "sft-log"), "progress": False}})
    return {"seed": seed, "sft_dir": str(sft_dir), "prompts": str(data["prompts"]), "seconds": time.perf_counter() - t0}


def ppo_config(model: str, prompts: str, run_dir: Path, seed: int, eta: float, steps: int, prompts_per_step: int,
               kl_coef: float, icm_lr: float, lr: float, every: int) -> dict[str, Any]:
    """PPO with a value head and the KL penalty in the reward (the paper's set-up); curiosity when eta > 0."""
    curiosity = {"eta": eta, "top_k": 1, "lr": icm_lr} if eta > 0 else None
    return {
        "algorithm": "ppo",
        "model": {"path": model, "critic": "value_head"},
        "data": {"path": prompts},
        "rollout": {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0.8},  # the paper's rollout temperature
        "reward": {"functions": [task.FavouriteWordsReward()], "curiosity": curiosity, "clip": 2.5},
        "algo": {"gamma": 1.0, "lam": 0.95, "kl_coef": kl_coef, "kl_in": "reward", "value_clip": 0.2,
                 "vf_coef": 0.5, "whiten_advantages": True, "epochs": 1},
        "train": {"steps": steps, "prompts_per_step": prompts_per_step, "mini_batch_size": max(1, prompts_per_step // 2),
                  "micro_batch_size": max(1, prompts_per_step // 2), "lr": lr, "seed": seed, "device": "cpu"},
        "logging": {"name": run_dir.name, "run_dir": str(run_dir), "progress": False, "print_every": 0},
        "checkpoint": {"every": every, "keep_last": 1000, "save_final": True, "overwrite": True},  # a rerun recomputes
    }


def _instrument_curiosity() -> None:
    """Log, per step, the size of the curiosity bonus per sequence next to the extrinsic score's spread."""
    import align.rewards.curiosity as cur

    if getattr(cur.CuriosityModule, "instrumented", False):
        return

    class Instrumented(cur.CuriosityModule):
        instrumented = True

        def compute(self, states, actions, mask, topk_hit):
            out = super().compute(states, actions, mask, topk_hit)
            per_seq = self.eta * out.intrinsic.sum(dim=-1)  # what curiosity adds to a sequence's return
            out.metrics["curiosity/seq_bonus_std"] = float(per_seq.std()) if per_seq.numel() > 1 else 0.0
            out.metrics["curiosity/seq_bonus_absmean"] = float(per_seq.abs().mean())
            return out

    cur.CuriosityModule = Instrumented


def evaluate(policy_dir: Path, n: int, seed: int, sentbert: bool) -> dict[str, Any]:
    """24 prompts x n samples at temperature 1.0: diversity (released counting), reward, word shares."""
    from align.commands.diversity import load_model, sample_completions
    from align.diversity import diversity, load_sentbert

    model, tokenizer = load_model(policy_dir, "cpu")
    prompts = list(task.PROMPTS) * EVAL_REPEATS
    groups = sample_completions(model, tokenizer, prompts, n, temperature=1.0, top_p=1.0,
                                max_new_tokens=MAX_NEW_TOKENS, seed=10_000 + seed)
    metrics: dict[str, Any] = diversity(groups, sentbert=sentbert, sentbert_model=load_sentbert() if sentbert else None)
    flat = [c for g in groups for c in g]
    scores = task.FavouriteWordsReward()([""] * len(flat), flat)
    metrics["reward"] = sum(scores) / len(scores)
    metrics["max_reward_rate"] = sum(s == task.MAX_REWARD for s in scores) / len(scores)
    metrics |= task.word_shares(groups)
    metrics["example"] = groups[0][:3]
    return metrics


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One PPO run (seed, eta) from that seed's SFT model, then every checkpoint evaluated."""
    _one_thread()
    _instrument_curiosity()
    import align

    run_dir = Path(job["out"]) / f"seed{job['seed']}" / f"eta{job['eta']:g}"
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        result = align.train(ppo_config(job["sft_dir"], job["prompts"], run_dir, job["seed"], job["eta"], job["steps"],
                                        job["prompts_per_step"], job["kl_coef"], job["icm_lr"], job["lr"], job["every"]))
    except Exception as err:  # a diverged run is a result to report, not a reason to lose the other runs
        return {"eta": job["eta"], "seed": job["seed"], "error": f"{type(err).__name__}: {err}"}
    train_s = time.perf_counter() - t0
    checkpoints = []
    for ckpt in sorted((run_dir / "checkpoints").glob("step-*")):
        step = int(ckpt.name.split("-")[1])
        final = step == job["steps"]
        m = evaluate(ckpt, job["n"], job["seed"], job["sentbert"] and final)
        checkpoints.append({"step": step, **m})
    keep = ("reward/mean", "reward/std", "kl/mean_seq", "rollout/response_length", "rollout/truncated", "policy/entropy",
            "curiosity/gate_rate", "curiosity/icm_loss",
            "curiosity/error_mean", "curiosity/seq_bonus_std", "curiosity/seq_bonus_absmean")
    history = [{k: h.get(k) for k in keep if h.get(k) is not None} | {"step": h["step"]} for h in result.history]
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the numbers are kept; the weights are not needed
    record = {"eta": job["eta"], "seed": job["seed"], "train_seconds": train_s,
              "eval_seconds": time.perf_counter() - t0 - train_s, "final": checkpoints[-1], "checkpoints": checkpoints,
              "history": history}
    (run_dir / "result.json").write_text(json.dumps(record))  # survives a later failure of the whole experiment
    return record


def _sft_eval(item: dict[str, Any], n: int, sentbert: bool) -> dict[str, Any]:
    _one_thread()
    return {"seed": item["seed"], **evaluate(Path(item["sft_dir"]), n, item["seed"], sentbert)}


def _map(fn, items: Sequence[Any], jobs: int) -> list[Any]:
    if jobs <= 1:
        return [fn(x) for x in items]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        return list(pool.map(fn, items))


def run_experiment(out: Path, seeds: Sequence[int], etas: Sequence[float] = ETAS, steps: int = 560,
                   prompts_per_step: int = 16, n_samples: int = 10, sentbert: bool = True, sft_epochs: int = 8,
                   n_sft: int = 2000, kl_coef: float = 0.05, icm_lr: float = 1e-4, lr: float = 5e-4,
                   n_checkpoints: int = 4, jobs: int = 1) -> dict[str, Any]:
    import functools

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sfts = _map(functools.partial(warm_start, out, sft_epochs=sft_epochs, n_sft=n_sft), list(seeds), jobs)
    sft_s = time.perf_counter() - t0
    sft_evals = _map(functools.partial(_sft_eval, n=n_samples, sentbert=sentbert), sfts, jobs)
    every = max(1, steps // n_checkpoints)
    jobs_list = [{"out": str(out), "seed": s["seed"], "eta": float(e), "sft_dir": s["sft_dir"], "prompts": s["prompts"],
                  "steps": steps, "prompts_per_step": prompts_per_step, "kl_coef": kl_coef, "icm_lr": icm_lr, "lr": lr,
                  "every": every, "n": n_samples, "sentbert": sentbert} for s in sfts for e in etas]
    runs, failed = [], []
    for r in _map(run_one, jobs_list, jobs):
        if "error" in r:
            print(f"eta={r['eta']:g} seed={r['seed']}: FAILED {r['error']}", flush=True)
            failed.append(r)
            continue
        f = r["final"]
        print(f"eta={r['eta']:g} seed={r['seed']}: reward {f['reward']:+.3f}  diversity {f['diversity']:.4f}  "
              f"favourites {f['favourite_share']:.2f}  ({r['train_seconds']:.0f} s)  e.g. {f['example'][:2]}", flush=True)
        runs.append(r)
    refs = report.oracle_references(len(task.PROMPTS) * EVAL_REPEATS, n_samples)
    results = {"seeds": list(seeds), "etas": [float(e) for e in etas], "steps": steps,
               "prompts_per_step": prompts_per_step, "n_samples": n_samples,
               "eval_prompts": len(task.PROMPTS) * EVAL_REPEATS, "kl_coef": kl_coef, "icm_lr": icm_lr, "lr": lr,
               "sft_epochs": sft_epochs, "n_sft": n_sft, "sft_seconds": sft_s, "sft_models": sft_evals,
               "oracles": refs, "runs": runs, "failed_runs": failed, "wall_seconds": time.perf_counter() - t0,
               "reward_margin": report.REWARD_MARGIN}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return write_report(out)


def write_report(out: Path) -> dict[str, Any]:
    """Statistics, table.md and the plot from OUT/results.json (also `--report-only`: no training)."""
    results = json.loads((out / "results.json").read_text())
    results["comparison"] = report.compare(results)
    results["comparison_excluding_diverged"] = report.compare(results, exclude_diverged=True)
    results["matched_reward"] = report.matched_reward_gain(results)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "table.md").write_text(report.format_tables(results))
    report.plot(results, out / "cd_rlhf.png")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/cd_rlhf")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--etas", type=float, nargs="+", default=list(ETAS), help="0 is always added")
    parser.add_argument("--eta", type=float, default=None, help="shorthand for --etas 0 ETA")
    parser.add_argument("--steps", type=int, default=560)
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--n", type=int, default=10, help="samples per evaluation prompt (24 prompts)")
    parser.add_argument("--sft-epochs", type=int, default=8)
    parser.add_argument("--n-sft", type=int, default=2000)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=5e-4, help="PPO learning rate")
    parser.add_argument("--icm-lr", type=float, default=1e-4)
    parser.add_argument("--checkpoints", type=int, default=4, help="evaluated checkpoints per run")
    parser.add_argument("--jobs", type=int, default=1, help="processes at once (one torch thread each)")
    parser.add_argument("--no-sentbert", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="recompute statistics, table and plot from OUT/results.json")
    parser.add_argument("--docs", default=None, help="copy the plot cd_rlhf.png into this directory")
    args = parser.parse_args(argv)
    etas = [0.0, args.eta] if args.eta is not None else args.etas
    etas = sorted({0.0, *(float(e) for e in etas)})
    if any(e < 0 for e in etas):
        parser.error("--etas must be >= 0")
    if args.report_only:
        results = write_report(Path(args.out))
        print(report.format_tables(results))
        return 0
    results = run_experiment(Path(args.out), args.seeds, etas, args.steps, args.prompts_per_step, args.n,
                             not args.no_sentbert, args.sft_epochs, args.n_sft, args.kl_coef, args.icm_lr, args.lr,
                             n_checkpoints=args.checkpoints, jobs=args.jobs)
    print(report.format_tables(results))
    print(f"total {results['wall_seconds']:.0f} s (SFT {results['sft_seconds']:.0f} s)")
    if args.docs and (Path(args.out) / "cd_rlhf.png").is_file():
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(args.out) / "cd_rlhf.png", docs / "cd_rlhf.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
