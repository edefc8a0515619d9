"""The two reward models of the RLTAF experiment (examples/rltaf.py) as jobs of its graph (examples/jobgraph.py).

One random-init backbone, copy-pretrained once (`rm_base_job`), is the start of both RMs; each is trained with
the same pairs, steps, batch and lr (`train_rm_job`, what `align train-rm` runs) and then measured on held-out
pairs with its full scoring path, Themis with its trace loop and the real Calendar tool (`measure_rm_job`).
`assemble_rms` puts the jobs' results into the record the report reads (`rms.json`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import rltaf_task as task
from jobgraph import cpu_seconds

KINDS = ("plain", "themis")


def rm_params(p: dict[str, Any]) -> dict[str, Any]:
    """The settings the two RMs and their measurements depend on."""
    return {k: v for k, v in p.items() if k.startswith(("rm_", "themis_", "copy_")) or k == "question_form"}


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
    common = dict(batch_size=p["copy_batch"], lr=p["copy_lr"], seed=seed, span=(p["copy_span_min"], p["copy_span_max"]),
                  sep_id=tok.convert_tokens_to_ids("\n"), log=lambda s: print(f"  [{base.name}] {s}", flush=True),
                  log_every=250)
    if p.get("copy_induct_steps", 0) > 0:
        # then rows only content matching copies: random prefix and gap (the span's place and the distance to
        # the repeat vary) over a small random sub-vocabulary per row (a token recurs, so the match must use
        # more than the one token before it, as a city after "in " must)
        from copy_pretrain import pretrain_copy_stages

        # copy_induct_gap: the longest gap (default 16); a trace copies a weather field from 30-260 characters back
        content = {"steps": p["copy_induct_steps"], "prefix": (0, 16), "gap": (0, p.get("copy_induct_gap", 16)),
                   "sub_vocab": (4, len(vocab))}
        stats = pretrain_copy_stages(model, vocab, [{"steps": steps}, content], **common)
    else:
        stats = pretrain_copy(model, vocab, steps=steps, **common)
    model.save_pretrained(base)
    stats.update(vocab_size=len(vocab), wall_s=time.perf_counter() - t0, cpu_s=cpu_seconds() - c0)
    done.write_text(json.dumps(stats))
    return stats

def write_rm_data(out: Path, p: dict[str, Any], tara: bool) -> dict[str, list[str]]:
    """The RMs' training and held-out pairs (TARA format) under OUT/data; their sources as `train-rm` reads them."""
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
    return {"train_sources": [str(train_pairs)] + (["tara:calendar"] if tara else []),
            "eval_sources": [str(test_pairs)] + [str(m) for m in mixed] + (["tara:calendar:test"] if tara else [])}


def rm_base_job(out: Path, p: dict[str, Any]) -> dict[str, Any]:
    """The backbone both RMs start from (same backbone and budget): random init with seed 1234, copy-pretrained."""
    from align.testing import DEFAULT_ALPHABET, make_tiny_model

    base = out / "rm-base"
    if not (base / "config.json").is_file():
        # rm_extra_chars: characters of the task's text beyond ASCII (TARA's weather cities: 'São Paulo'), so
        # that a call can copy them instead of an unknown token
        make_tiny_model(base, hidden_size=p["rm_hidden"], num_layers=p["rm_layers"], num_heads=4, seed=1234,
                        alphabet=DEFAULT_ALPHABET + p.get("rm_extra_chars", ""),
                        max_position_embeddings=p["rm_max_length"] + 128)
    # base_threads: the base is the graph's only job while it builds (every RM waits on it), so it may use the
    # cores of the workers its job holds (slots = base_threads); the worker's own count is put back after
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(p.get("base_threads", threads))
    try:
        return {"copy_pretrain": copy_pretrain_base(base, p["rm_copy_steps"], p, seed=1234)}
    finally:
        torch.set_num_threads(threads)


def train_rm_job(out: Path, kind: str, p: dict[str, Any], sources: Sequence[str], seed: int = 0,
                 max_rounds: int | None = None, rm_dir: Path | None = None) -> dict[str, Any]:
    """Train one RM (`kind` plain or themis) from the shared base OUT/rm-base into `rm_dir` (default
    OUT/rm-KIND); its training metrics. `seed` sets the value head's init and the batch order (stage 2 uses
    seed + 1); `max_rounds` the Themis call budget (default: `themis_rounds(p)`)."""
    from align.command_configs import RMTrainConfig
    from align.rewards.training import train_reward_model

    rm_dir = rm_dir or out / f"rm-{kind}"
    # stage 1 from the shared backbone; stage 2 (rm_steps2 > 0) continues from stage 1's checkpoint with a
    # fresh cosine cycle and new shuffling: a warm restart, the same for both RMs
    # rm_init: both RMs continue from their namesakes in an earlier run dir (same budget for both) instead
    # of starting from the shared base; a Themis checkpoint's LM is the start, its value head new
    start0 = Path(p["rm_init"]) / f"rm-{kind}" if p["rm_init"] else out / "rm-base"
    stages = [(rm_dir.with_name(f"{rm_dir.name}-stage1"), start0, p["rm_steps"], p["rm_lr"], seed)] if p["rm_steps2"] else []
    stages.append((rm_dir, stages[0][0] if stages else start0, p["rm_steps2"] or p["rm_steps"],
                   p["rm_lr2"] if p["rm_steps2"] else p["rm_lr"], seed + 1 if p["rm_steps2"] else seed))
    for stage_dir, start, steps, lr, stage_seed in stages:
        if (stage_dir / "train_metrics.json").is_file():
            continue
        settings = rm_settings(kind, start, p, sources, steps, lr, stage_seed, max_rounds or themis_rounds(p), stage_dir)
        if p["rm_ranks"] > 1:
            train_on_ranks(settings, p["rm_ranks"], out / "jobs" / f"{stage_dir.name}.train-rm.json")
        else:
            train_reward_model(RMTrainConfig.from_dict(settings), log=lambda s, k=kind: print(f"  [rm {k}] {s}", flush=True))
    res: dict[str, Any] = {"train": json.loads((rm_dir / "train_metrics.json").read_text())}
    if len(stages) == 2:
        res["stage1_train"] = json.loads((stages[0][0] / "train_metrics.json").read_text())
    return res


def rm_settings(kind: str, start: Path, p: dict[str, Any], sources: Sequence[str], steps: int, lr: float, seed: int,
                max_rounds: int, out_dir: Path) -> dict[str, Any]:
    """The `align train-rm` config of one RM stage (`kind` plain or themis) from checkpoint `start` into `out_dir`."""
    model = ({"kind": "classifier", "path": str(start), "head": "value_head"} if kind == "plain"
             else {"kind": "themis", "path": str(start)})
    return {
        "model": {**model, "max_length": p["rm_max_length"]},
        "data": {"train": list(sources)},
        "train": {"epochs": p["rm_epochs"], "max_steps": steps, "batch_size": p["rm_batch"], "lr": lr,
                  "warmup_ratio": p.get("rm_warmup", 0.05), "weight_decay": 0.01, "seed": seed, "threads": 1,
                  "log_every": 50},
        "themis": {"max_new_tokens": p["themis_new_tokens"], "max_rounds": max_rounds, "omega": p["themis_omega"]},
        "output_dir": str(out_dir)}


def train_on_ranks(settings: dict[str, Any], ranks: int, config_file: Path) -> None:
    """`align train-rm` data-parallel on `ranks` local gloo ranks of one torch thread each, as a user runs it:
    `torchrun --standalone --nproc-per-node RANKS -m align.cli train-rm CONFIG`. Its output goes to this job's
    log; a rank that fails fails the job (CalledProcessError), a stalled collective ends at its timeout."""
    import os
    import subprocess
    import sys

    from align.command_configs import RMTrainConfig

    RMTrainConfig.from_dict(settings)  # a bad setting fails here, in this process, with the config's message
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(json.dumps(settings, indent=1))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                    "-m", "align.cli", "train-rm", str(config_file)], check=True, env=env)


def measure_rm_job(out: Path, kind: str, p: dict[str, Any], evals: Sequence[str]) -> dict[str, Any]:
    """Held-out pairwise accuracy of one trained RM on each eval source; for Themis also the trace checks."""
    from align.rewards.training import evaluate_reward_model

    rm_dir = out / f"rm-{kind}"
    ev = {}
    for src in evals:
        r = evaluate_reward_model(str(rm_dir), [src])
        ev[Path(src).stem if src.endswith(".jsonl") else src] = {"accuracy": r["pairwise_accuracy"], "n": r["n"]}
    res: dict[str, Any] = {"eval": ev}
    if kind == "themis":
        questions = task.split_questions(form=p["question_form"])["rm_test"][:p["rm_test"]][:64]
        res["trace_checks"] = themis_trace_checks(rm_dir, questions, p)
    print(f"  [rm {kind}] held-out pairwise accuracy: " +
          ", ".join(f"{k} {v['accuracy']:.3f} (n={v['n']})" for k, v in ev.items()), flush=True)
    return res


def assemble_rms(data: dict[str, list[str]], base: dict[str, Any], trained: dict[str, dict[str, Any]],
                 measured: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The jobs' results as one record (rms.json; what the report reads): sources, copy pre-training, and per
    RM its training metrics, held-out accuracies and the CPU / wall of its training and of its measurement."""
    rms: dict[str, Any] = {**data, "copy_pretrain": base["copy_pretrain"]}
    for kind in KINDS:
        t, m = trained[kind], measured[kind]
        rms[kind] = {"train": t["train"], "eval": m["eval"],
                     "train_wall_s": t["_job"]["wall_s"], "train_cpu_s": t["_job"]["cpu_s"],
                     "eval_wall_s": m["_job"]["wall_s"], "eval_cpu_s": m["_job"]["cpu_s"]}
        rms[kind].update({k: v for k, v in (*t.items(), *m.items()) if k in ("stage1_train", "trace_checks")})
    return rms


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
