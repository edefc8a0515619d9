"""Generative Themis on TARA calendar or weather (`--task`) with a character-level, copy-pretrained backbone,
optionally with a check call: after the calendar tool, `Answer.mentions('<observation>')`
(align.tools.answer_check) says whether the judged answer states what the tool returned (after
history_weather, the asked attribute's value in the observation: `Answer.mentions('27.0(C)')`), and the value
head reads that `yes` / `no`.

Why (docs/experiments/themis_tara.md, "Session 9"): the RLTAF experiment's Themis (3 x 128, character
tokens, copy pre-training; examples/rltaf.py) judges its task perfectly once the tool does the comparison
and the model only copies spans; on TARA calendar the same model copies the dates of about half the test
questions and its value head does not compare answer and observation (52.5% on pairs with both observations
right). This script trains, from one copy-pretrained character-level base, with the same pairs, steps, batch
and lr per seed:
  plain   Bradley-Terry on "Question: q\\nAnswer: a" (value head at the EOS);
  themis  Themis without a rationale (the released loss with omega = 0, scored after the last observation),
          its traces TARA's gold call, plus the check call with `--check` (`max_rounds` 2).
Data: TARA calendar train (320 pairs) plus `--synth` synthetic calendar pairs from TARA's own question
templates (align.rewards.themis_synth); a training pair (TARA's or synthetic) whose call a test question needs is
dropped. Weather: TARA weather train (476 pairs) plus synthetic pairs from TARA's weather cache, never a
city-date a test pair asks about or calls; with `--pseudo-cities S` a share S of the synthetic pairs names a
made-up city (meant to leave the call nothing to recall; measured: it does not make the model copy); with
`--random-names S` a share S names a city of independently drawn letters on a uniformly random date (nothing left
to predict: the call can only copy), and `--hard-names` shapes those names like the real ones a copy fails on
(several words, repeated letter pairs); `--check-thought field` writes the asked field and its value in the
check call's Thought. Measured on the
106 TARA calendar (158 weather) test pairs through the public scoring path (`ThemisRewardModel.score`, real tools): valid
first call, gold first observation, pairwise accuracy, accuracy on pairs whose both sides got the gold
observation; plain RM pairwise accuracy. Jobs run on `--workers` one-thread processes (examples/jobgraph.py).

    ALIGN_TARA_DIR=/path/to/tara python examples/themis_tara_check.py --out runs/tara_check --check --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rltaf_task as task  # noqa: E402
from jobgraph import Job, graph_cost, run_jobs  # noqa: E402
from rltaf_rms import rm_base_job, train_rm_job  # noqa: E402

CHECK_ACTION = "Answer.mentions"
CHECK_THOUGHT = "Check the answer."
TASKS = ("calendar", "weather")
RM_SETTINGS = {"rm_ranks": 1, "rm_epochs": 100.0, "rm_batch": 8, "rm_lr": 3e-3, "rm_steps2": 0, "rm_init": "", "rm_max_length": 560,
               "themis_new_tokens": 128, "themis_omega": 0.0, "themis_trace": "released", "themis_worked": 0, "copy_batch": 32, "copy_lr": 1e-3,
               "copy_span_min": 4, "copy_span_max": 24}


def _one_thread() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


def _weather_attr(question: str, observation: str) -> str | None:
    """The attribute a weather question ('What is the ATTR in CITY on DATE?') asks about when the observation
    is history_weather's; else None."""
    from align.rewards.themis_synth import _WEATHER_Q

    m = _WEATHER_Q.fullmatch(question.strip())
    return m["attr"] if m and observation.startswith("The weather for") else None


def check_input(question: str, observation: str) -> str:
    """What the check call looks for: the calendar tool's whole observation; for a weather question the asked
    attribute's value in the history_weather observation."""
    from align.rewards.themis_synth import observation_value

    attr = _weather_attr(question, observation)
    return observation_value(attr, observation) if attr else observation


def check_thought(question: str, observation: str, field: bool = False) -> str:
    """The check call's Thought: CHECK_THOUGHT; with `field`, for a weather question, the asked attribute and
    its value as the observation writes them first (`... gives overall weather: Cloudy. ...`): writing the
    attribute's name puts the model where a copy continues with the value (the look-up the plain Thought left
    to the Action Input missed in half the samples, themis_tara.md session 12), and the Action Input copies it
    from the line above."""
    attr = _weather_attr(question, observation) if field else None
    return f"The observation gives {attr}: {check_input(question, observation)}. Check the answer." if attr else CHECK_THOUGHT


def extra_chars(task_name: str) -> str:
    """The characters of the task's TARA texts (both splits; for weather also the cache's keys) beyond the character tokenizer's ASCII alphabet,
    sorted: TARA weather's cities ('São Paulo', 'Reykjavík') are copied into calls character by character."""
    from align.rewards.tara import load_tara
    from align.testing import DEFAULT_ALPHABET

    seen = {c for split in ("train", "test") for it in load_tara([task_name], split)
            for c in it.question + it.pos.answer + it.neg.answer}
    if task_name == "weather":  # the synthetic pairs' cities: every key of the cache
        from align.tools.data import load_json, tara_dir

        seen |= {c for key in load_json(tara_dir() / "weather_history.json") for c in key}
    return "".join(sorted(seen - set(DEFAULT_ALPHABET)))


def _side(answer: Any, check: bool, question: str = "", field_thought: bool = False) -> dict[str, Any]:
    """One side of a pair as a raw TARA record; with `check` the Answer.mentions call of the first call's
    observation (`check_input`) follows it, its observation computed by the real tool on this side's answer
    (its Thought `check_thought(..., field_thought)`)."""
    from align.tools import call_tool

    steps = [{"Thought": s.thought, "Action": s.action, "Action Input": s.action_input, "Observation": s.observation}
             for s in answer.steps]
    if check:
        needle = check_input(question, answer.steps[0].observation)
        res = call_tool(CHECK_ACTION, needle, {"answer": answer.answer})
        thought = check_thought(question, answer.steps[0].observation, field_thought)
        steps.append({"Thought": thought, "Action": CHECK_ACTION, "Action Input": needle, "Observation": res.observation()})
    return {"answer": answer.answer, "score": answer.score, "actions": task.actions_text(steps),
            "score_agent": {"explanation": answer.rationale, "score": str(answer.score)}}


def pair_record(item: Any, check: bool, field_thought: bool = False) -> dict[str, Any]:
    """A TARA item as a raw TARA record (what `train-rm` reads), each side with the check call if `check`."""
    return {"id": item.id, "question": item.question, "pos_answer": _side(item.pos, check, item.question, field_thought),
            "neg_answer": _side(item.neg, check, item.question, field_thought)}


def _synthetic(task_name: str, n: int, train: list, test: list, pseudo_cities: float = 0.0,
               random_names: float = 0.0, hard_names: bool = False) -> tuple[list, Any]:
    """n synthetic pairs of the task and the predicate a training pair must pass (it touches nothing a test
    pair needs: a calendar call a test question makes; a weather city-date a test pair asks about or calls).
    pseudo_cities: the share of synthetic weather pairs with a made-up city (`themis_synth.pseudo_city`);
    random_names: the share with a city of random letters and a random date (`themis_synth.random_letter_city`;
    with hard_names `hard_letter_city`: several words, repeated letter pairs)."""
    from align.rewards import themis_synth as ts

    if task_name == "calendar":
        banned = {(s.action, s.action_input.strip()) for it in test for s in it.pos.steps}
        made = ts.synth_calendar(n, random.Random(1234), ts.calendar_templates(train)) if n else []
        return made, lambda it: (it.pos.steps[0].action, it.pos.steps[0].action_input.strip()) not in banned
    from align.tools.data import load_json, tara_dir

    exclude = ts.city_dates_of(test)
    cache = load_json(tara_dir() / "weather_history.json")
    made = ts.synth_weather(n, random.Random(1234), cache, ts.weather_keys(cache, exclude),
                            ts.weather_answer_templates(train), pseudo_cities=pseudo_cities,
                            city_rng=random.Random(4321), random_names=random_names, hard_names=hard_names) if n else []
    return made, lambda it: not (ts.city_dates_of([it]) & exclude)


def write_data(out: Path, synth: int, check: bool, task_name: str = "calendar",
               pseudo_cities: float = 0.0, random_names: float = 0.0, hard_names: bool = False,
               field_thought: bool = False) -> dict[str, Any]:
    """TARA train + synthetic pairs of the task as TARA-format jsonl (OUT/data/train.jsonl); field_thought:
    the check call's Thought names the asked field and its value (`check_thought`)."""
    from align.rewards.tara import load_tara

    train, test = load_tara([task_name], "train"), load_tara([task_name], "test")
    made, allowed = _synthetic(task_name, synth, train, test, pseudo_cities, random_names, hard_names)

    def unseen(items: list) -> list:  # no training pair touches what a test pair needs (TARA's train has some)
        return [it for it in items if allowed(it)]

    tara, kept = unseen(train), unseen(made)
    path = task.write_jsonl(out / "data" / "train.jsonl", [pair_record(it, check, field_thought) for it in tara + kept])
    return {"path": str(path), "tara_train": len(tara), "tara_train_dropped": len(train) - len(tara),
            "synthetic": len(kept), "synthetic_dropped": len(made) - len(kept)}


def rm_job(out: Path, kind: str, seed: int, p: dict[str, Any], source: str) -> dict[str, Any]:
    """One RM of one seed (OUT/seedS/rm-KIND), trained from the shared base with the seed's batch order, then
    measured (the plain RM always in one process)."""
    rm_dir = out / f"seed{seed}" / f"rm-{kind}"
    res = train_rm_job(out, kind, {**p, "rm_ranks": 1}, [source], seed=seed, max_rounds=p["rounds"], rm_dir=rm_dir)
    return {**res, **measure(rm_dir, kind, p)}


def themis_train_job(out: Path, seed: int, p: dict[str, Any], source: str) -> dict[str, Any]:
    """The Themis RM of one seed trained on p["rm_ranks"] data-parallel ranks (a job holding that many workers)."""
    return train_rm_job(out, "themis", p, [source], seed=seed, max_rounds=p["rounds"],
                        rm_dir=out / f"seed{seed}" / "rm-themis")


def themis_measure_job(out: Path, seed: int, p: dict[str, Any], trained: str) -> dict[str, Any]:
    """The trained Themis RM of one seed measured; its training metrics read from that job's saved result."""
    res = json.loads((out / "jobs" / f"{trained}.json").read_text())["result"]
    return {**{k: v for k, v in res.items() if k != "_job"}, "train_job": res["_job"],
            **measure(out / f"seed{seed}" / "rm-themis", "themis", p)}


def measure(rm_dir: Path, kind: str, p: dict[str, Any]) -> dict[str, Any]:
    from align.rewards.tara import load_tara

    task_name = p.get("task", "calendar")  # settings written before --task (session 10) are calendar's
    items = load_tara([task_name], "test")
    n = len(items)
    if kind == "plain":
        from align.rewards.training import evaluate_reward_model

        r = evaluate_reward_model(str(rm_dir), [f"tara:{task_name}:test"])
        return {"accuracy": r["pairwise_accuracy"], "n_pairs": r["n"]}
    from themis_generative import call_shares

    from align.rewards.themis import ThemisRewardModel

    rm = ThemisRewardModel(str(rm_dir), max_rounds=p["rounds"], max_new_tokens=p["themis_new_tokens"],
                           max_length=p["rm_max_length"], batch_size=32, device="cpu")
    res = rm.score([it.question for it in items] * 2, [it.pos.answer for it in items] + [it.neg.answer for it in items],
                   context=[it.context for it in items] * 2)
    pos, neg = res.scores[:n], res.scores[n:]
    calls = [info["tool_calls"] for info in res.info]
    gold_obs = [it.pos.steps[0].observation for it in items] * 2
    gold = [bool(c) and c[0]["ok"] and c[0]["observation"] == g for c, g in zip(calls, gold_obs)]
    both = [k for k in range(n) if gold[k] and gold[k + n]]
    sides = ["pos"] * n + ["neg"] * n
    needles = [check_input(q, g) for q, g in zip([it.question for it in items] * 2, gold_obs)]
    check_right = [len(c) > 1 and c[1]["action"] == CHECK_ACTION and c[1]["input"].strip() == g and
                   c[1]["observation"] == ("yes" if s == "pos" else "no") for c, g, s in zip(calls, needles, sides)]
    return {"accuracy": sum(a > b for a, b in zip(pos, neg)) / n, "n_pairs": n,
            **call_shares(calls, [[g] for g in gold_obs]),
            "both_gold_pairs": len(both), "accuracy_both_gold": sum(pos[k] > neg[k] for k in both) / max(1, len(both)),
            "check_call_right_share": sum(check_right) / (2 * n) if p["rounds"] > 1 else None,
            "examples": [{"question": items[k % n].question, "trace": res.info[k]["trace"], "score": res.scores[k]}
                         for k in (0, n, 1, n + 1, 2, n + 2)]}


def run(out: Path, seeds: Sequence[int], p: dict[str, Any], workers: int) -> dict[str, Any]:
    _one_thread()
    t0, load0 = time.perf_counter(), os.getloadavg()
    data = write_data(out, p["synth"], p["check"], p.get("task", "calendar"), p.get("pseudo_cities", 0.0),
                      p.get("random_names", 0.0), p.get("hard_names", False), p.get("check_thought") == "field")
    key = dict(p)
    jobs = [Job("rm-base", rm_base_job, (out, p), (), key, p.get("base_threads", 1))]
    # the Themis RMs first (the long jobs), the plain RMs fill the other worker; with rm_ranks > 1 each Themis
    # RM trains data-parallel in a job holding that many workers, and its measurement is a job of its own
    if p["rm_ranks"] > 1:
        jobs += [Job(f"seed{s}-themis-train", themis_train_job, (out, s, p, data["path"]), ("rm-base",), key,
                     p["rm_ranks"]) for s in seeds]
        jobs += [Job(f"seed{s}-themis", themis_measure_job, (out, s, p, f"seed{s}-themis-train"),
                     (f"seed{s}-themis-train",), key) for s in seeds]
        jobs += [Job(f"seed{s}-plain", rm_job, (out, "plain", s, p, data["path"]), ("rm-base",), key) for s in seeds]
    else:
        jobs += [Job(f"seed{s}-{kind}", rm_job, (out, kind, s, p, data["path"]), ("rm-base",), key)
                 for kind in ("themis", "plain") for s in seeds]
    done = run_jobs(jobs, out / "jobs", workers=workers, initializer=_one_thread)
    results = {"params": p, "seeds": list(seeds), "data": data, "copy_pretrain": done["rm-base"]["copy_pretrain"],
               "runs": [{"seed": s, "themis": done[f"seed{s}-themis"], "plain": done[f"seed{s}-plain"]} for s in seeds],
               "wall_s": time.perf_counter() - t0, "graph": graph_cost(done), "workers": workers,
               "loadavg_start": load0, "loadavg_end": os.getloadavg()}
    diffs = [r["themis"]["accuracy"] - r["plain"]["accuracy"] for r in results["runs"]]
    from rltaf_report import t_interval

    results["themis_minus_plain"] = t_interval(diffs) if len(diffs) > 1 else {"mean": diffs[0]}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "themis_tara_check.png")
    return results


def plot(results: dict[str, Any], path: Path) -> None:
    """Per seed: Themis and plain pairwise accuracy, Themis' valid-call and gold-observation shares."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the numbers are in results.json either way
        return
    runs = results["runs"]
    bars = {"themis accuracy": [r["themis"]["accuracy"] for r in runs], "plain accuracy": [r["plain"]["accuracy"] for r in runs],
            "themis valid call": [r["themis"]["valid_call_share"] for r in runs],
            "themis gold observation": [r["themis"]["gold_observation_share"] for r in runs]}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(bars)
    for k, (name, vals) in enumerate(bars.items()):
        ax.bar([i + k * width for i in range(len(runs))], [100 * v for v in vals], width, label=name)
    ax.axhline(90, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(runs))], [f"seed {r['seed']}" for r in runs])
    task_name = results["params"].get("task", "calendar")
    ax.set_ylabel(f"% of TARA {task_name} test pairs / samples")
    ax.set_title(f"Themis with a check call vs plain RM (character-level 3 x 128, TARA {task_name})")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/tara_check"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--task", choices=TASKS, default="calendar", help="the TARA tool group trained and measured")
    ap.add_argument("--check", action="store_true", help="traces end with the Answer.mentions check call")
    ap.add_argument("--synth", type=int, default=3000, help="synthetic pairs added to TARA's train split")
    ap.add_argument("--max-length", type=int, default=RM_SETTINGS["rm_max_length"],
                    help="characters of a trace the RMs see (the last ones); weather traces are longer")
    ap.add_argument("--pseudo-cities", type=float, default=0.0, metavar="SHARE",
                    help="weather: the share of synthetic pairs whose city is a made-up name (themis_tara.md, session 11)")
    ap.add_argument("--random-names", type=float, default=0.0, metavar="SHARE",
                    help="weather: the share of synthetic pairs whose city is random letters and date a random day (themis_tara.md, session 12)")
    ap.add_argument("--hard-names", action="store_true",
                    help="with --random-names: the names have several words and repeated letter pairs in half the pairs (themis_tara.md, session 13)")
    ap.add_argument("--check-thought", choices=("plain", "field"), default="plain",
                    help="weather with --check: 'field' writes the asked field and its value in the check call's Thought")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--copy-steps", type=int, default=1500)
    ap.add_argument("--new-tokens", type=int, default=RM_SETTINGS["themis_new_tokens"], metavar="N",
                    help="Themis' tokens per tool round at test (the tool phase's budget is N x (calls + 1), "
                         "observations included): a weather observation alone is about 260 character tokens")
    ap.add_argument("--copy-induct-steps", type=int, default=0, metavar="N",
                    help="after the copy steps, N steps on rows only content matching copies (random prefix, gap, sub-vocabulary)")
    ap.add_argument("--base-threads", type=int, default=1, metavar="N",
                    help="torch threads of the copy base's job (it holds N workers; nothing else runs while it builds)")
    ap.add_argument("--copy-induct-gap", type=int, default=16, metavar="N",
                    help="with --copy-induct-steps: the content-copy rows' longest gap between span and repeat")
    ap.add_argument("--rm-lr", type=float, default=RM_SETTINGS["rm_lr"], help="both RMs' peak learning rate")
    ap.add_argument("--warmup", type=float, default=0.05, metavar="SHARE",
                    help="both RMs' linear warmup, a share of --steps (then cosine decay)")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--rm-ranks", type=int, default=1,
                    help="data-parallel ranks (torchrun -m align.cli train-rm) that train each Themis RM")
    ap.add_argument("--measure", type=Path, default=None, metavar="THEMIS_DIR",
                    help="only measure this Themis checkpoint on the task's TARA test pairs (--rounds calls)")
    ap.add_argument("--rounds", type=int, default=None, help="with --measure: the call budget (default 2 with --check, else 1)")
    args = ap.parse_args(argv)
    for flag, share in (("--pseudo-cities", args.pseudo_cities), ("--random-names", args.random_names)):
        if share and (args.task != "weather" or not 0 < share <= 1):
            ap.error(f"{flag} is a share in (0, 1] of the synthetic weather pairs: use it with --task weather")
    if args.pseudo_cities and args.random_names:
        ap.error("--pseudo-cities and --random-names exclude each other: give one")
    if args.hard_names and not args.random_names:
        ap.error("--hard-names shapes the random-letter names: give --random-names SHARE with it")
    if args.check_thought == "field" and not (args.check and args.task == "weather"):
        ap.error("--check-thought field names a weather field in the check call: use it with --task weather --check")
    if not 1 <= args.base_threads <= args.workers:
        ap.error(f"--base-threads {args.base_threads}: the base's job holds that many of the --workers {args.workers}; give 1..{args.workers}")
    if args.copy_induct_gap < 0:
        ap.error(f"--copy-induct-gap {args.copy_induct_gap}: give a gap >= 0")
    if args.copy_induct_gap != 16 and args.copy_induct_steps <= 0:
        ap.error("--copy-induct-gap sets the content-copy stage's gap: give --copy-induct-steps N with it")
    if not (args.rm_lr > 0 and 0 <= args.warmup < 1):
        ap.error(f"--rm-lr {args.rm_lr} --warmup {args.warmup}: give a learning rate > 0 and a warmup share in [0, 1)")
    if args.measure:
        _one_thread()
        rounds = args.rounds or (2 if args.check else 1)
        m = measure(args.measure, "themis", {**RM_SETTINGS, "rounds": rounds, "rm_max_length": 1024, "task": args.task,
                                             "themis_new_tokens": args.new_tokens})
        print(json.dumps({k: v for k, v in m.items() if k != "examples"}))
        return 0
    p = {**RM_SETTINGS, "rm_steps": args.steps, "rm_copy_steps": args.copy_steps, "rm_layers": args.layers,
         "rm_hidden": args.hidden, "synth": args.synth, "check": args.check, "rounds": 2 if args.check else 1,
         "rm_ranks": args.rm_ranks, "task": args.task, "rm_max_length": args.max_length,
         **({"rm_extra_chars": extra} if (extra := extra_chars(args.task)) else {}),
         **({"pseudo_cities": args.pseudo_cities} if args.pseudo_cities else {}),
         **({"random_names": args.random_names} if args.random_names else {}),
         **({"hard_names": True} if args.hard_names else {}),
         **({"check_thought": "field"} if args.check_thought == "field" else {}),
         **({"base_threads": args.base_threads} if args.base_threads > 1 else {}),
         "themis_new_tokens": args.new_tokens, "rm_lr": args.rm_lr,
         **({"rm_warmup": args.warmup} if args.warmup != 0.05 else {}),
         **({"copy_induct_steps": args.copy_induct_steps} if args.copy_induct_steps else {}),
         **({"copy_induct_gap": args.copy_induct_gap} if args.copy_induct_gap != 16 else {})}
    res = run(args.out, args.seeds, p, args.workers)
    for r in res["runs"]:
        t, pl = r["themis"], r["plain"]
        print(f"seed {r['seed']}: themis acc {100 * t['accuracy']:.1f} valid {100 * t['valid_call_share']:.1f} "
              f"gold {100 * t['gold_observation_share']:.1f} both-gold {t['both_gold_pairs']} at "
              f"{100 * t['accuracy_both_gold']:.1f} check {t['check_call_right_share']} | plain acc {100 * pl['accuracy']:.1f}")
    print(json.dumps(res["themis_minus_plain"]), f"wall {res['wall_s']:.0f} s, graph CPU {res['graph']['cpu_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
