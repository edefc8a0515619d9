"""RLTAF at CPU scale: GRPO whose reward is a tool-augmented RM (Themis) vs a plain RM vs the oracle.

The task (examples/rltaf_task.py): "What date is N days after YYYY-MM-DD?" (1 <= N <= 9, no month wrap).
Pipeline, every stage through the library's public entry points:
  1. preference pairs (the right date vs a date 1-3 days off) in TARA format, plus TARA calendar;
  2. two RMs on ONE random-init backbone with the same data, steps, batch and lr (`train_reward_model`, what
     `align train-rm` runs): plain (value head on "Question: q\\nAnswer: a") and Themis (writes a
     `Calendar.target_day` call, reads the tool's observation, writes a rationale, v_head on the EOS);
     pairwise accuracy on held-out pairs (full trace loop, real tool calls) is measured first;
  3. per seed: a tiny random-init policy, SFT warm start (`align.sft`) on few steps (well below the ceiling);
  4. per seed, from that SFT model: GRPO (`align.train`) with reward `themis` (checkpoint path), `classifier_rm`
     (checkpoint path) or the oracle exact-date reward; GRPO's group standardisation makes the RM score a
     standardised score; the oracle rides along at weight 0 so the logs carry the ground truth of the same
     samples (reward hacking: RM score vs truth per step, from completions.jsonl);
  5. greedy ground-truth accuracy on held-out questions, per-question win/tie/lose, paired-by-seed t-interval;
  6. a PPO smoke run (a few steps, Themis reward).

The stages are jobs of a graph (examples/jobgraph.py; RMs in examples/rltaf_rms.py): a job waits only for
what it reads, `--workers W` runs them on W one-thread processes (2 on a 2-core machine: the SFT models, the
plain RM and the cheap arms fill one core while the Themis RM trains), and a rerun with the same settings
reads every finished job back from OUT/jobs/.

    python examples/rltaf.py --out runs/rltaf --workers 2 --docs docs/experiments   # the experiment
    python examples/rltaf.py --out X --smoke                                          # seconds, tiny
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the task and report modules sit next to this file

import rltaf_report as report  # noqa: E402
import rltaf_task as task  # noqa: E402
from jobgraph import Job, cpu_seconds, graph_cost, run_jobs  # noqa: E402
from rltaf_rms import (  # noqa: E402
    KINDS,
    assemble_rms,
    copy_pretrain_base,
    measure_rm_job,
    rm_base_job,
    rm_params,
    themis_rounds,
    train_rm_job,
    write_rm_data,
)

ARMS = ("themis", "plain", "oracle")
PLAIN_TEMPLATE = "Question: {prompt}\nAnswer: {completion}"  # render_plain: what the plain RM was trained on
ORACLE = "rltaf_task:exact_date"  # an import path (this folder is on sys.path), as a user names their own reward


def _one_thread() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


# ----- policy ----------------------------------------------------------------------------------------------

def make_policy_base(path: Path, seed: int, p: dict[str, Any]) -> Path:
    from align.testing import make_tiny_model

    make_tiny_model(path, hidden_size=p["policy_hidden"], num_layers=p["policy_layers"], num_heads=4,
                    seed=seed, max_position_embeddings=128)
    copy_pretrain_base(path, p["policy_copy_steps"], p, seed=seed)
    return path


def warm_start(out: Path, seed: int, p: dict[str, Any]) -> Path:
    from align.supervised import sft

    splits = task.split_questions(form=p["question_form"])
    root = out / f"seed{seed}"
    sft_dir = root / "sft-model"
    if not (sft_dir / "config.json").is_file():
        data = task.write_jsonl(root / "sft.jsonl", task.sft_rows(splits["sft"][:p["sft_examples"]]))
        base = make_policy_base(root / "policy-base", seed, p)
        sft({"model": {"path": str(base)}, "data": {"path": str(data), "max_length": 96},
             "train": {"max_steps": p["sft_steps"], "epochs": 100, "batch_size": 32, "lr": p["sft_lr"], "seed": seed,
                       "device": "cpu", "warmup_steps": 10},
             "output_dir": str(sft_dir), "logging": {"name": "sft", "run_dir": str(root / "sft-log"), "progress": False}})
    return sft_dir


def reward_spec(arm: str, out: Path, p: dict[str, Any]) -> list[dict[str, Any]]:
    """The reward functions of an arm, as a user writes them in the config. The oracle rides along at weight 0
    in the RM arms: it changes nothing in the update and logs the truth of the same samples."""
    if arm == "oracle":
        return [{"name": ORACLE, "weight": 1.0}]
    if arm == "themis":
        rm = {"name": "themis", "weight": 1.0,
              "kwargs": {"model_path": str(out / "rm-themis"), "max_rounds": themis_rounds(p),
                         "max_new_tokens": p["themis_new_tokens"], "batch_size": 64, "device": "cpu"}}
    else:
        rm = {"name": "classifier_rm", "weight": 1.0,
              "kwargs": {"model_path": str(out / "rm-plain"), "template": PLAIN_TEMPLATE, "batch_size": 64, "device": "cpu"}}
    return [rm, {"name": ORACLE, "weight": 0.0}]


def rl_config(algorithm: str, arm: str, model: Path, prompts: Path, run_dir: Path, seed: int, steps: int,
              out: Path, p: dict[str, Any]) -> dict[str, Any]:
    rows = p["prompts_per_step"] * p["group_size"]
    algo = ({"group_size": p["group_size"], "scale": p["rl_scale"], "kl_coef": p["kl_coef"], "epochs": 1,
             "filter_zero_variance": bool(p["filter_zero_variance"])}
            if algorithm == "grpo" else {"kl_coef": 0.05, "epochs": 1})
    return {
        "algorithm": algorithm,
        "model": {"path": str(model)},
        "data": {"path": str(prompts)},
        "rollout": {"max_new_tokens": 12, "temperature": p["rl_temperature"]},  # 10 characters, EOS, one spare
        "reward": {"functions": reward_spec(arm, out, p)},
        "algo": algo,
        "train": {"steps": steps, "prompts_per_step": p["prompts_per_step"], "micro_batch_size": rows,
                  "lr": p["rl_lr"], "warmup_steps": p["rl_warmup"], "seed": seed, "device": "cpu"},
        "logging": {"name": run_dir.name, "run_dir": str(run_dir), "progress": False, "print_every": 0,
                    "completions_every": 1, "completions_rows": rows},  # every sample of every step
        "checkpoint": {"save_final": True, "overwrite": True},
    }


def run_arm(out: Path, seed: int, arm: str, sft_dir: Path, p: dict[str, Any], algorithm: str = "grpo",
            steps: int | None = None) -> dict[str, Any]:
    import align

    root = out / f"seed{seed}"
    rl_questions = task.split_questions(rl=p["rl_questions"], form=p["question_form"])["rl"]
    prompts = task.write_jsonl(root / "rl_prompts.jsonl", task.prompt_rows(rl_questions))
    run_dir = root / f"{algorithm}-{arm}"
    t0, c0 = time.perf_counter(), cpu_seconds()
    align.train(rl_config(algorithm, arm, sft_dir, prompts, run_dir, seed, steps or p["rl_steps"], out, p))
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    final = sorted((run_dir / "checkpoints").glob("step-*"), key=lambda d: int(d.name.split("-")[1]))[-1]
    return {"run_dir": str(run_dir), "final": str(final), "wall_s": wall, "cpu_s": cpu,
            "curve": report.hacking_curve(run_dir / "completions.jsonl", arm)}


def evaluate_policy(policy_dir: Path, questions: Sequence[task.Question]) -> list[bool]:
    """Greedy answers to held-out questions, judged by the exact date."""
    from align.commands.diversity import load_model, sample_completions

    model, tok = load_model(Path(policy_dir), "cpu")
    groups = sample_completions(model, tok, [q.text for q in questions], 1, temperature=0.0, top_p=1.0,
                                max_new_tokens=12, batch_size=256)
    return [g[0].strip() == q.answer for g, q in zip(groups, questions)]


def expected_accuracy(policy_dir: Path, questions: Sequence[task.Question]) -> float:
    """The exact expected accuracy of sampling at temperature 1 (GRPO's objective): the mean over questions of
    p(right answer + EOS | question), teacher-forced (examples/rltaf_oracle_probe.py); a secondary measure."""
    import math

    from rltaf_oracle_probe import seq_logprobs

    from align.commands.diversity import load_model

    model, tok = load_model(Path(policy_dir), "cpu")
    lp = seq_logprobs(model, tok, [q.text for q in questions], [q.answer for q in questions], [True] * len(questions))
    return sum(math.exp(v) for v in lp) / len(lp)


def sft_params(p: dict[str, Any]) -> dict[str, Any]:
    """The settings a seed's SFT model and its held-out measurement depend on."""
    return {k: v for k, v in p.items() if k.startswith(("policy_", "sft_", "copy_")) or k in ("question_form", "heldout")}


def heldout_questions(p: dict[str, Any]) -> list[task.Question]:
    return task.split_questions(form=p["question_form"])["heldout"][:p["heldout"]]


def sft_job(out: Path, seed: int, p: dict[str, Any]) -> dict[str, Any]:
    """A seed's SFT warm start and its held-out greedy and expected accuracy."""
    heldout = heldout_questions(p)
    sft_dir = warm_start(out, seed, p)
    rec = {"sft": {"correct": evaluate_policy(sft_dir, heldout), "expected": expected_accuracy(sft_dir, heldout)}}
    copied = out / f"seed{seed}" / "policy-base" / "copy_pretrain.json"
    rec["policy_copy_pretrain"] = json.loads(copied.read_text()) if copied.is_file() else None
    print(f"seed {seed}: SFT accuracy {sum(rec['sft']['correct']) / len(heldout):.3f}", flush=True)
    return rec


def arm_job(out: Path, seed: int, arm: str, p: dict[str, Any]) -> dict[str, Any]:
    """GRPO of one arm from the seed's SFT model; the final policy's held-out accuracies."""
    heldout = heldout_questions(p)
    r = run_arm(out, seed, arm, out / f"seed{seed}" / "sft-model", p)
    r["correct"] = evaluate_policy(Path(r["final"]), heldout)
    r["expected"] = expected_accuracy(Path(r["final"]), heldout)
    print(f"seed {seed}: GRPO {arm:<6} accuracy {sum(r['correct']) / len(heldout):.3f}  "
          f"({r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} s CPU)", flush=True)
    shutil.rmtree(Path(r["run_dir"]) / "checkpoints", ignore_errors=True)  # numbers kept, weights not needed
    return r


def ppo_smoke_job(out: Path, seed: int, steps: int, p: dict[str, Any]) -> dict[str, Any]:
    """A few PPO steps with the Themis reward: the pipeline runs with PPO as well."""
    r = run_arm(out, seed, "themis", out / f"seed{seed}" / "sft-model", p, algorithm="ppo", steps=steps)
    shutil.rmtree(Path(r["run_dir"]) / "checkpoints", ignore_errors=True)
    return {"seed": seed, "steps": steps, "wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "curve": r["curve"]}


def pipeline_jobs(out: Path, seeds: Sequence[int], p: dict[str, Any], data: dict[str, list[str]], tara: bool,
                  ppo_smoke_steps: int, rm_only: bool) -> list[Job]:
    """The experiment as a job graph, in priority order: the critical path (RM base, Themis RM) first, the SFT
    models and the plain RM, then the Themis arms (the longest) ahead of the plain and oracle arms, which fill
    the gaps, and the Themis RM's held-out measurement (which no arm waits for) last. The plain RM stays ahead
    of the arms: trained on several ranks it holds every worker, and behind the Themis arms it would leave one
    idle while the last Themis arm runs."""
    rm_key, key = {"rm": rm_params(p), "tara": tara}, {"p": p, "tara": tara}

    def rm(kind: str, stage: str, after: str) -> Job:
        fn, src = (train_rm_job, "train_sources") if stage == "train" else (measure_rm_job, "eval_sources")
        return Job(f"rm-{kind}-{stage}", fn, (out, kind, p, data[src]), (after,), rm_key,
                   p["rm_ranks"] if stage == "train" else 1)

    base = Job("rm-base", rm_base_job, (out, p), (), rm_key)
    themis_train, themis_eval = rm("themis", "train", "rm-base"), rm("themis", "eval", "rm-themis-train")
    plain = [rm("plain", "train", "rm-base"), rm("plain", "eval", "rm-plain-train")]
    if rm_only:
        return [base, themis_train, *plain, themis_eval]
    sfts = [Job(f"seed{s}-sft", sft_job, (out, s, p), (), sft_params(p)) for s in seeds]
    arms = [Job(f"seed{s}-{arm}", arm_job, (out, s, arm, p), (f"seed{s}-sft",) + ((f"rm-{arm}-train",) if arm in KINDS else ()),
                key) for arm in ("themis", "plain", "oracle") for s in seeds]
    smoke = ([Job("ppo-smoke", ppo_smoke_job, (out, seeds[0], ppo_smoke_steps, p), (f"seed{seeds[0]}-sft", "rm-themis-train"),
                  {**key, "steps": ppo_smoke_steps})] if ppo_smoke_steps else [])
    return [base, themis_train, *sfts, *plain, *arms, themis_eval, *smoke]


def run_experiment(out: Path, seeds: Sequence[int], p: dict[str, Any], tara: bool = True, ppo_smoke_steps: int = 3,
                   rm_only: bool = False, workers: int = 1) -> dict[str, Any]:
    _one_thread()
    out.mkdir(parents=True, exist_ok=True)
    t0, c0, started = time.perf_counter(), cpu_seconds(), time.time()
    load0 = os.getloadavg()
    data = write_rm_data(out, p, tara)
    done = run_jobs(pipeline_jobs(out, seeds, p, data, tara, ppo_smoke_steps, rm_only), out / "jobs", workers=workers,
                    initializer=_one_thread)
    rms = assemble_rms(data, done["rm-base"], {k: done[f"rm-{k}-train"] for k in KINDS},
                       {k: done[f"rm-{k}-eval"] for k in KINDS})
    cost = {"wall_s": time.perf_counter() - t0, "cpu_s": cpu_seconds() - c0, "workers": workers,
            "graph": graph_cost(done), "jobs": {name: r["_job"] for name, r in done.items()},
            "read_back": sorted(name for name, r in done.items() if r["_job"]["end"] < started),
            "loadavg_start": load0, "loadavg_end": os.getloadavg()}
    if rm_only:  # step 3 of the recipe: measure the RMs before any RL
        rms.update(params=p, **cost)
        (out / "rms.json").write_text(json.dumps(rms, indent=1))
        return rms
    runs = []
    for s in seeds:
        rec = {"seed": s, **{k: v for k, v in done[f"seed{s}-sft"].items() if k != "_job"}}
        rec.update({arm: done[f"seed{s}-{arm}"] for arm in ARMS})
        rec["wall_s"] = sum(done[f"seed{s}-{j}"]["_job"]["wall_s"] for j in ("sft", *ARMS))
        runs.append(rec)
    results = {"params": p, "seeds": list(seeds), "heldout_questions": len(heldout_questions(p)), "tara": tara, "rms": rms,
               "runs": runs, "ppo_smoke": done.get("ppo-smoke"), **cost, "machine": report.machine()}
    results["summary"] = report.summarise(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(report.format_tables(results))
    report.plot(results, out / "rltaf.png")
    return results

DEFAULTS: dict[str, Any] = {
    "rm_hidden": 128, "rm_layers": 3, "rm_max_length": 320, "rm_pairs": 2000, "rm_test": 400, "rm_epochs": 100.0,
    "rm_steps": 800, "rm_batch": 8, "rm_lr": 3e-3, "rm_steps2": 600, "rm_lr2": 2e-3, "themis_new_tokens": 100,
    # weight of the rationale in Themis' LM loss (released 1.0); its one informative token is the verdict
    "themis_omega": 1.0,
    # 1: the synthetic pairs' rationales compare the day digits before the verdict (rltaf_task.worked_comparison);
    # run 2's name for themis_trace=worked
    "themis_worked": 0,
    # Themis' synthetic traces (rltaf_task.TRACES): released (one call, verdict), worked (run 2), compare (two
    # calls: target_day, then day_difference of the answer and that date, '0' exactly when it is right)
    "themis_trace": "released",
    # shares of the RM training pairs whose negative is a date in another month / a malformed string (the rest
    # hard negatives, 1-3 days off); rm_test_mixed: held-out pairs with only such negatives (0 = none)
    "rm_far": 0.0, "rm_malformed": 0.0, "rm_test_mixed": 0,
    # a run dir whose rm-plain and rm-themis the two RMs continue from ("" = the shared base, as in runs 1-2)
    "rm_init": "",
    # data-parallel ranks (gloo, one thread each) that train each RM: `torchrun -m align.cli train-rm`, the same
    # steps and batch as one process (tests/distributed/test_train_rm_ranks.py), each rank half of every batch;
    # the job occupies that many of the graph's workers
    "rm_ranks": 1,
    # the questions' phrasing (rltaf_task.FORMS): "after" (runs 1-3), "later" (run 4: the first call's input
    # `YYYY-MM-DD, N` is a span of the question)
    "question_form": "after",
    "policy_hidden": 64, "policy_layers": 2, "sft_examples": 3000, "sft_steps": 350, "sft_lr": 3e-3,
    # GRPO: AdamW's first step moves every weight by lr * sign(gradient); at the former lr 5e-4 with no warm-up
    # that one step took the oracle arm from 44.0% to 9.8% greedy (docs/experiments/rltaf.md, "Why the oracle
    # arm fell"); 3e-5 with 10 warm-up steps keeps the steps inside the region where the gradient is right
    "prompts_per_step": 8, "group_size": 4, "rl_steps": 40, "rl_lr": 3e-5, "rl_warmup": 10, "rl_temperature": 1.0,
    "filter_zero_variance": 0, "kl_coef": 0.0, "heldout": 600,
    # GRPO's advantage scale (algo.scale): "group" divides by each group's std, so the RM's spread among eight
    # wrong answers becomes a full-size advantage; "batch" divides by the batch's std (TRL scale_rewards="batch")
    "rl_scale": "group",
    # RL prompt pool (the last slice of rltaf_task.split_questions: the other splits do not depend on it)
    "rl_questions": 2000,
    # copy pre-training (examples/copy_pretrain.py) of the RM base (shared by both RMs) and of each policy base
    "rm_copy_steps": 0, "policy_copy_steps": 0, "copy_lr": 1e-3, "copy_batch": 32, "copy_span_min": 4,
    "copy_span_max": 24,
}
SMOKE: dict[str, Any] = {**DEFAULTS, "rm_hidden": 32, "rm_layers": 1, "rm_max_length": 192, "rm_pairs": 16, "rm_test": 8,
                         "rm_steps": 2, "rm_steps2": 0, "rm_batch": 4, "themis_new_tokens": 8, "policy_hidden": 32, "policy_layers": 1,
                         "sft_examples": 32, "sft_steps": 2, "prompts_per_step": 2, "group_size": 2, "rl_steps": 1,
                         "heldout": 8, "rm_copy_steps": 2, "policy_copy_steps": 2, "copy_batch": 4}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/rltaf")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: the pipeline end to end in seconds")
    ap.add_argument("--no-tara", action="store_true", help="RMs on the synthetic pairs only (no ALIGN_TARA_DIR needed)")
    ap.add_argument("--ppo-smoke-steps", type=int, default=3)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help=f"override a size ({', '.join(DEFAULTS)})")
    ap.add_argument("--workers", type=int, default=1,
                    help="processes running the pipeline's jobs (one torch thread each); 2 on a 2-core machine")
    ap.add_argument("--rm-only", action="store_true", help="train and measure the two RMs only (OUT/rms.json)")
    ap.add_argument("--report-only", action="store_true", help="recompute summary, table and plot from OUT/results.json")
    ap.add_argument("--docs", default=None, help="copy results.json (as rltaf_results.json) and rltaf.png here")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        results = json.loads((out / "results.json").read_text())
        results["summary"] = report.summarise(results)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        (out / "table.md").write_text(report.format_tables(results))
        report.plot(results, out / "rltaf.png")
    else:
        p = dict(SMOKE if args.smoke else DEFAULTS)
        for kv in args.set:
            k, _, v = kv.partition("=")
            if k not in p:
                ap.error(f"unknown size {k!r}")
            p[k] = type(p[k])(v)
        results = run_experiment(out, args.seeds, p, tara=not args.no_tara, ppo_smoke_steps=args.ppo_smoke_steps,
                                 rm_only=args.rm_only, workers=args.workers)
        if args.rm_only:
            return 0
    print(report.format_tables(results))
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "results.json", docs / "rltaf_results.json")
        if (out / "rltaf.png").is_file():
            shutil.copy(out / "rltaf.png", docs / "rltaf.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
