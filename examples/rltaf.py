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

    python examples/rltaf.py --out runs/rltaf --docs docs/experiments     # the experiment (JSON, table, plot)
    python examples/rltaf.py --out X --smoke                                # seconds: the whole pipeline, tiny
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the task and report modules sit next to this file

import rltaf_report as report  # noqa: E402
import rltaf_task as task  # noqa: E402

ARMS = ("themis", "plain", "oracle")
PLAIN_TEMPLATE = "Question: {prompt}\nAnswer: {completion}"  # render_plain: what the plain RM was trained on
ORACLE = "rltaf_task:exact_date"  # an import path (this folder is on sys.path), as a user names their own reward


def _one_thread() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def copy_pretrain_base(base: Path, steps: int, p: dict[str, Any], seed: int) -> dict[str, Any] | None:
    """Give a random-init backbone the copy skill a pretrained LM has (examples/copy_pretrain.py: uniform
    random spans over the tokenizer's ordinary tokens, a newline, the span again; no task text), in place.
    Runs once per directory (copy_pretrain.json records it); steps 0 = off."""
    if steps <= 0:
        return None
    done = base / "copy_pretrain.json"
    if done.is_file():
        return json.loads(done.read_text())
    from copy_pretrain import pretrain_copy
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    vocab = [i for i in range(len(tok)) if i not in set(tok.all_special_ids)]
    t0, c0 = time.perf_counter(), cpu_seconds()
    stats = pretrain_copy(model, vocab, steps=steps, batch_size=p["copy_batch"], lr=p["copy_lr"], seed=seed,
                          span=(p["copy_span_min"], p["copy_span_max"]), sep_id=tok.convert_tokens_to_ids("\n"),
                          log=lambda s: print(f"  [{base.name}] {s}", flush=True), log_every=250)
    model.save_pretrained(base)
    stats.update(vocab_size=len(vocab), wall_s=time.perf_counter() - t0, cpu_s=cpu_seconds() - c0)
    done.write_text(json.dumps(stats))
    return stats


# ----- reward models ---------------------------------------------------------------------------------------

def train_rms(out: Path, p: dict[str, Any], tara: bool) -> dict[str, Any]:
    """Both RMs from one backbone, the same pairs, steps, batch and lr; then held-out pairwise accuracy."""
    from align.command_configs import RMTrainConfig
    from align.rewards.training import evaluate_reward_model, train_reward_model
    from align.testing import make_tiny_model

    splits = task.split_questions(form=p["question_form"])
    data = out / "data"
    trace = themis_trace(p)  # only Themis reads traces and rationales; the plain RM's text is the same either way
    train_pairs = task.write_pairs(data / "rm_train.jsonl", splits["rm_train"][:p["rm_pairs"]], seed=1, trace=trace,
                                   far=p["rm_far"], malformed=p["rm_malformed"])
    # held-out: run 1's and run 2's pairs (hard negatives only, the same questions and negatives whatever the
    # trace), and with rm_test_mixed > 0 pairs of the first held-out questions whose negatives are only dates
    # in another month or malformed strings (the SFT policy's other wrong answers)
    test_pairs = task.write_pairs(data / "rm_test.jsonl", splits["rm_test"][:p["rm_test"]], seed=2, trace=trace)
    mixed = ([task.write_pairs(data / "rm_test_mixed.jsonl", splits["rm_test"][:p["rm_test_mixed"]], seed=3,
                               trace=trace, far=0.4, malformed=0.6)] if p["rm_test_mixed"] else [])
    base = out / "rm-base"
    if not (base / "config.json").is_file():
        make_tiny_model(base, hidden_size=p["rm_hidden"], num_layers=p["rm_layers"], num_heads=4, seed=1234,
                        max_position_embeddings=p["rm_max_length"] + 128)
    # one copy-pretrained base for BOTH RMs (same backbone and budget); seed 1234 as the init
    copy_stats = copy_pretrain_base(base, p["rm_copy_steps"], p, seed=1234)
    sources = [str(train_pairs)] + (["tara:calendar"] if tara else [])
    evals = [str(test_pairs)] + [str(m) for m in mixed] + (["tara:calendar:test"] if tara else [])
    results: dict[str, Any] = {"train_sources": sources, "eval_sources": evals, "copy_pretrain": copy_stats}
    for kind in ("plain", "themis"):
        rm_dir = out / f"rm-{kind}"
        t0, c0 = time.perf_counter(), cpu_seconds()
        # stage 1 from the shared backbone; stage 2 (rm_steps2 > 0) continues from stage 1's checkpoint with a
        # fresh cosine cycle and new shuffling: a warm restart, the same for both RMs
        # rm_init: both RMs continue from their namesakes in an earlier run dir (same budget for both) instead
        # of starting from the shared base; a Themis checkpoint's LM is the start, its value head new
        start0 = Path(p["rm_init"]) / f"rm-{kind}" if p["rm_init"] else base
        stages = [(out / f"rm-{kind}-stage1", start0, p["rm_steps"], p["rm_lr"], 0)] if p["rm_steps2"] else []
        stages.append((rm_dir, stages[0][0] if stages else start0, p["rm_steps2"] or p["rm_steps"],
                       p["rm_lr2"] if p["rm_steps2"] else p["rm_lr"], 1 if p["rm_steps2"] else 0))
        for stage_dir, start, steps, lr, seed in stages:
            if (stage_dir / "train_metrics.json").is_file():
                continue
            model = ({"kind": "classifier", "path": str(start), "head": "value_head"} if kind == "plain"
                     else {"kind": "themis", "path": str(start)})
            cfg = RMTrainConfig.from_dict({
                "model": {**model, "max_length": p["rm_max_length"]},
                "data": {"train": sources},
                "train": {"epochs": p["rm_epochs"], "max_steps": steps, "batch_size": p["rm_batch"],
                          "lr": lr, "warmup_ratio": 0.05, "weight_decay": 0.01, "seed": seed, "threads": 1,
                          "log_every": 50},
                "themis": {"max_new_tokens": p["themis_new_tokens"], "max_rounds": themis_rounds(p),
                           "omega": p["themis_omega"]},
                "output_dir": str(stage_dir)})
            train_reward_model(cfg, log=lambda s, k=kind: print(f"  [rm {k}] {s}", flush=True))
        train_metrics = json.loads((rm_dir / "train_metrics.json").read_text())
        t1, c1 = time.perf_counter(), cpu_seconds()
        ev = {}
        for src in evals:
            r = evaluate_reward_model(str(rm_dir), [src])
            ev[Path(src).stem if src.endswith(".jsonl") else src] = {"accuracy": r["pairwise_accuracy"], "n": r["n"]}
        results[kind] = {"train": train_metrics, "eval": ev, "train_wall_s": t1 - t0, "train_cpu_s": c1 - c0,
                         "eval_wall_s": time.perf_counter() - t1, "eval_cpu_s": cpu_seconds() - c1}
        if len(stages) == 2:
            results[kind]["stage1_train"] = json.loads((stages[0][0] / "train_metrics.json").read_text())
        if kind == "themis":
            results[kind]["trace_checks"] = themis_trace_checks(rm_dir, splits["rm_test"][:p["rm_test"]][:64], p)
        print(f"  [rm {kind}] held-out pairwise accuracy: " +
              ", ".join(f"{k} {v['accuracy']:.3f} (n={v['n']})" for k, v in ev.items()), flush=True)
    return results


def themis_trace(p: dict[str, Any]) -> str:
    """The synthetic traces Themis learns (rltaf_task.TRACES); `themis_worked=1` is run 2's name for "worked"."""
    trace = "worked" if p["themis_worked"] else p["themis_trace"]
    if trace not in task.TRACES:
        raise ValueError(f"themis_trace must be one of {', '.join(task.TRACES)}, got {trace!r}")
    return trace


def themis_rounds(p: dict[str, Any]) -> int:
    """Tool calls a Themis trace may make: two for "compare" (target_day, then day_difference), else one."""
    return 2 if themis_trace(p) == "compare" else 1


def themis_trace_checks(rm_dir: Path, questions: Sequence[task.Question], p: dict[str, Any]) -> dict[str, Any]:
    """On held-out questions, Themis' full trace loop for three answers each: the right date, a hard negative
    and a malformed string (rltaf_task.malformed_negative): the call shares (`call_shares`) and example traces."""
    import random

    from align.rewards.registry import get_reward

    rm = get_reward("themis", model_path=str(rm_dir), max_rounds=themis_rounds(p),
                    max_new_tokens=p["themis_new_tokens"], batch_size=32)
    rng = random.Random(4)
    answers = {"right": [q.answer for q in questions], "hard": [task.hard_negative(q, rng) for q in questions],
               "malformed": [task.malformed_negative(q, rng) for q in questions]}
    res: dict[str, Any] = {}
    scores = {}
    for kind, ans in answers.items():
        out = rm.score([q.text for q in questions], ans)
        scores[kind] = out.scores
        res[kind] = {**call_shares(questions, out.info, ans, compare=themis_rounds(p) == 2),
                     "mean_score": sum(out.scores) / max(1, len(out.scores)),
                     "example_trace": out.info[0]["trace"] if questions else None}
    n = max(1, len(questions))
    for kind in ("hard", "malformed"):  # the right answer scored above this wrong one, per question
        res[kind]["pairwise_vs_right"] = sum(r > w for r, w in zip(scores["right"], scores[kind])) / n
    # run 1 / run 2 field names: the first call's shares on right answers
    res.update(n=len(questions), tool_accepts_share=res["right"]["tool_accepts_share"],
               valid_call_share=res["right"]["valid_call_share"], example_question=questions[0].text if questions else None)
    return res


def call_shares(questions: Sequence[task.Question], infos: Sequence[dict[str, Any]],
                answers: Sequence[str] | None = None, compare: bool = False) -> dict[str, Any]:
    """From each trace's call records (align.rewards.themis_traces: action, input, ok, observation, error):
    the share whose first call is Calendar.target_day and accepted by the tool, the share whose input is the
    question's own date and N and whose observation is therefore the right date. With the judged `answers`:
    the share whose rationale states the right verdict, and with `compare` the share whose second call is
    Calendar.day_difference of exactly '<answer>, <right date>' with the tool's answer
    (rltaf_task.compare_observation) as its observation, and the share with both calls right."""
    ok = good = second = both = verdict = 0
    for i, (q, info) in enumerate(zip(questions, infos)):
        calls = info["tool_calls"]
        call = calls[0] if calls else None
        accepted = call is not None and call["action"] == task.ACTION and call["ok"]
        ok += accepted
        first = accepted and call["input"].strip() == f"{q.start.isoformat()}, {q.n}" and \
            call["observation"].strip() == q.answer
        good += first
        if answers is None:
            continue
        a = answers[i]
        if compare:
            c2 = calls[1] if len(calls) > 1 else None
            right2 = c2 is not None and c2["action"] == task.COMPARE_ACTION and \
                c2["input"].strip() == f"{a}, {q.answer}" and c2["observation"].strip() == task.compare_observation(a, q.answer)
            second += right2
            both += first and right2
        verdict += (task.RIGHT if a == q.answer else task.WRONG) in info["rationale"]
    n = max(1, len(questions))
    out = {"n": len(questions), "tool_accepts_share": ok / n, "valid_call_share": good / n}
    if answers is not None:  # None for a Themis without a rationale (scored after the last observation)
        out["verdict_share"] = verdict / n if any(info["rationale"] for info in infos) else None
    if answers is not None and compare:
        out.update(second_call_share=second / n, both_calls_share=both / n)
    return out


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


def rm_params(p: dict[str, Any]) -> dict[str, Any]:
    """The settings the two RMs and their measurements depend on."""
    return {k: v for k, v in p.items() if k.startswith(("rm_", "themis_", "copy_")) or k == "question_form"}


def run_experiment(out: Path, seeds: Sequence[int], p: dict[str, Any], tara: bool = True, ppo_smoke_steps: int = 3,
                   rm_only: bool = False) -> dict[str, Any]:
    _one_thread()
    out.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), cpu_seconds()
    load0 = os.getloadavg()
    heldout = task.split_questions(form=p["question_form"])["heldout"][:p["heldout"]]
    measured = out / "rms.json"
    prior = json.loads(measured.read_text()) if measured.is_file() else None
    if not rm_only and prior is not None and rm_params(prior["params"]) == rm_params(p) \
            and ("tara:calendar" in prior["train_sources"]) == tara:
        rms = prior  # the RMs were trained and measured by `--rm-only` with these settings: not measured twice
        print(f"RMs and their held-out measurements from {measured} (same RM settings)", flush=True)
    else:
        rms = train_rms(out, p, tara)
    if rm_only:  # step 3 of the recipe: measure the RMs before any RL
        rms.update(params=p, wall_s=time.perf_counter() - t0, cpu_s=cpu_seconds() - c0, loadavg_start=load0,
                   loadavg_end=os.getloadavg())
        (out / "rms.json").write_text(json.dumps(rms, indent=1))
        return rms
    seeds_out = []
    for seed in seeds:
        # a seed finished with the same settings (e.g. by another process given other --seeds: seeds run in
        # parallel that way, one process per core) is read back, not run again
        done = out / f"seed{seed}" / "record.json"
        saved = json.loads(done.read_text()) if done.is_file() else None
        if saved is not None and saved["params"] == p:
            seeds_out.append(saved["record"])
            print(f"seed {seed}: read back from {done} (same settings)", flush=True)
            continue
        ts = time.perf_counter()
        sft_dir = warm_start(out, seed, p)
        rec: dict[str, Any] = {"seed": seed, "sft": {"correct": evaluate_policy(sft_dir, heldout),
                                                     "expected": expected_accuracy(sft_dir, heldout)}}
        copied = out / f"seed{seed}" / "policy-base" / "copy_pretrain.json"
        rec["policy_copy_pretrain"] = json.loads(copied.read_text()) if copied.is_file() else None
        print(f"seed {seed}: SFT accuracy {sum(rec['sft']['correct']) / len(heldout):.3f}", flush=True)
        for arm in ARMS:
            r = run_arm(out, seed, arm, sft_dir, p)
            r["correct"] = evaluate_policy(Path(r["final"]), heldout)
            r["expected"] = expected_accuracy(Path(r["final"]), heldout)
            print(f"seed {seed}: GRPO {arm:<6} accuracy {sum(r['correct']) / len(heldout):.3f}  "
                  f"({r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} s CPU)", flush=True)
            shutil.rmtree(Path(r["run_dir"]) / "checkpoints", ignore_errors=True)  # numbers kept, weights not needed
            rec[arm] = r
        rec["wall_s"] = time.perf_counter() - ts
        done.write_text(json.dumps({"params": p, "record": rec}))
        seeds_out.append(rec)
    smoke = None
    if ppo_smoke_steps:
        seed = seeds[0]
        r = run_arm(out, seed, "themis", out / f"seed{seed}" / "sft-model", p, algorithm="ppo", steps=ppo_smoke_steps)
        shutil.rmtree(Path(r["run_dir"]) / "checkpoints", ignore_errors=True)
        smoke = {"seed": seed, "steps": ppo_smoke_steps, "wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "curve": r["curve"]}
    results = {"params": p, "seeds": list(seeds), "heldout_questions": len(heldout), "tara": tara, "rms": rms,
               "runs": seeds_out, "ppo_smoke": smoke, "wall_s": time.perf_counter() - t0,
               "cpu_s": cpu_seconds() - c0, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
               "machine": report.machine()}
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
                                 rm_only=args.rm_only)
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
