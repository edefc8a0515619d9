"""How well does a trained Themis RM (or the plain RM) judge what the policy actually writes? Before RL.

From a seed's SFT model: `--samples` answers at temperature 1 to each of `--prompts` RL prompts (what GRPO's
first step scores), judged by the exact date and scored by the RM(s) of a finished `examples/rltaf.py --rm-only`
run. Reported per RM: the ranking accuracy (AUC over right / wrong samples of the same prompt, and over all),
and for Themis the share of traces whose two calls are right (rltaf.call_shares), the verdict share per kind of
answer (right, a date of the same month, another month, no date) and the CPU seconds per trace.

    python examples/rltaf_policy_samples.py runs/rltaf-tool --policy runs/rltaf-tool-tune/seed10/sft-model \\
        --prompts 64 --samples 8 --json runs/rltaf-tool/policy_samples.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rltaf  # noqa: E402
import rltaf_report as report  # noqa: E402
import rltaf_task as task  # noqa: E402


def kind_of(q: task.Question, answer: str) -> str:
    a = answer.strip()
    if a == q.answer:
        return "right"
    obs = task.compare_observation(a, q.answer)
    if obs.startswith("Error"):
        return "no date"
    return "same month" if a[:8] == q.answer[:8] and len(a) == 10 else "other"


def per_prompt_auc(scores: list[float], truth: list[bool], group: int) -> float | None:
    vals = [report.ranking_accuracy(scores[i:i + group], truth[i:i + group]) for i in range(0, len(scores), group)]
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="an examples/rltaf.py run dir with rm-themis and rm-plain")
    ap.add_argument("--policy", required=True)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="the run's sizes (themis_trace, ...)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rltaf._one_thread()
    p = dict(rltaf.DEFAULTS)
    for kv in args.set:
        k, _, v = kv.partition("=")
        p[k] = type(p[k])(v)
    from align.commands.diversity import load_model, sample_completions
    from align.rewards.registry import get_reward

    qs = task.split_questions()["rl"][-args.prompts:]  # the end of the RL pool: prompts a short RL run never reaches
    model, tok = load_model(Path(args.policy), "cpu")
    groups = sample_completions(model, tok, [q.text for q in qs], args.samples, temperature=1.0, top_p=1.0,
                                max_new_tokens=12, batch_size=256)
    prompts = [q.text for q in qs for _ in range(args.samples)]
    answers = [a for g in groups for a in g]
    questions = [q for q in qs for _ in range(args.samples)]
    truth = [a.strip() == q.answer for a, q in zip(answers, questions)]
    kinds = [kind_of(q, a) for q, a in zip(questions, answers)]
    res: dict[str, Any] = {"n": len(answers), "true_accuracy": sum(truth) / len(truth),
                           "kinds": {k: kinds.count(k) for k in sorted(set(kinds))}}
    for arm in ("themis", "plain"):
        spec = rltaf.reward_spec(arm, Path(args.out), p)[0]
        rm = get_reward(spec["name"], **spec["kwargs"])
        t0, c0 = time.perf_counter(), rltaf.cpu_seconds()
        out = rm.score(prompts, answers)
        cpu = rltaf.cpu_seconds() - c0
        r: dict[str, Any] = {"auc_all": report.ranking_accuracy(out.scores, truth),
                             "auc_within_prompt": per_prompt_auc(out.scores, truth, args.samples),
                             "cpu_s": cpu, "wall_s": time.perf_counter() - t0}
        if arm == "themis":
            traced = sum(not i["cached"] for i in out.info)
            r.update(traces=traced, cpu_s_per_trace=cpu / max(1, traced),
                     calls=rltaf.call_shares(questions, out.info, answers, compare=rltaf.themis_rounds(p) == 2))
            r["verdict_by_kind"] = {}
            for k in sorted(set(kinds)):
                idx = [i for i, x in enumerate(kinds) if x == k]
                want = task.RIGHT if k == "right" else task.WRONG
                r["verdict_by_kind"][k] = sum(want in out.info[i]["rationale"] for i in idx) / len(idx)
            wrong_but_zero = [(answers[i], out.info[i]["tool_calls"][1]["input"] if len(out.info[i]["tool_calls"]) > 1 else None)
                              for i in range(len(answers)) if not truth[i] and task.RIGHT in out.info[i]["rationale"]]
            r["wrong_judged_right_examples"] = wrong_but_zero[:12]
        res[arm] = r
        print(arm, json.dumps({k: v for k, v in r.items() if k != "wrong_judged_right_examples"}), flush=True)
    print(json.dumps({k: res[k] for k in ("n", "true_accuracy", "kinds")}))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
