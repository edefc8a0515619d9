"""Where a generative Themis RM fails on the RLTAF date task (examples/rltaf.py): two diagnostics.

- copy: teacher-forced, the share of Action Input characters ("YYYY-MM-DD, N") the model predicts right
  (argmax) from the question above it, and the share of whole inputs right. The same number on train and
  held-out questions means copying is not learned (rather than memorised); a high teacher-forced accuracy
  with wrong generated calls would point at a train / generation mismatch instead.
- gold call: the right call and the tool's observation are written into the trace, the model writes the
  rationale, the value head scores: pairwise accuracy, and how often the rationale's verdict is right. This
  isolates the comparison of answer and observation from the tool call.

- oracle lr probe: the oracle GRPO arm again from a finished run's SFT model at other learning rates; greedy
  held-out accuracy and the sampled (temperature 1) accuracy of the training samples per 10 steps.

    python examples/rltaf_diagnose.py runs/rltaf/rm-themis [--n 100]
    python examples/rltaf_diagnose.py runs/rltaf/rm-themis --oracle-lr 1e-4 3e-5 --seed 1 --probe-dir /tmp/rltaf-lr
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rltaf_task as task  # noqa: E402


def copy_accuracy(rm_dir: str, split: str, n: int) -> dict[str, Any]:
    import torch

    from align.rewards.tara import parse_item, render_item
    from align.rewards.themis import load_themis, pad_left

    model, tok = load_themis(rm_dir)
    model.eval()
    rng = random.Random(2)
    rows, spans = [], []
    for i, q in enumerate(task.split_questions()[split][:n]):
        seg = render_item(parse_item(task.tara_record(q, task.hard_negative(q, rng), i), split), "pos")
        enc = tok(seg.text, return_offsets_mapping=True)
        a = seg.text.index("Action Input: ") + len("Action Input: ")
        b = seg.text.index("\n", a)
        rows.append(enc["input_ids"])
        spans.append([k for k, (s, _) in enumerate(enc["offset_mapping"]) if a <= s < b])
    ids = pad_left(rows, tok.pad_token_id)
    mask = pad_left([[1] * len(r) for r in rows], 0)
    with torch.no_grad():
        logits, _ = model(ids, mask)
    hit = tot = exact = 0
    for r, (row, idx) in enumerate(zip(rows, spans)):
        off = ids.shape[1] - len(row)
        pred = logits[r, [off + k - 1 for k in idx]].argmax(-1).tolist()  # token k is predicted at k - 1
        gold = [row[k] for k in idx]
        hit += sum(p == g for p, g in zip(pred, gold))
        tot += len(gold)
        exact += pred == gold
    return {"split": split, "n": len(rows), "char_accuracy": hit / tot, "exact_inputs": exact / len(rows)}


def gold_call_accuracy(rm_dir: str, n: int) -> dict[str, Any]:
    """The right call and observation forced into the trace; the RM writes the rationale (greedy, in the
    rollout engine, token ids in and out) and its value head scores the EOS."""
    from align.rewards.tara import render_user
    from align.rewards.themis import ASSISTANT_HEADER, ThemisRewardModel
    from align.rollouts.params import SamplingParams
    from align.tools.trace import START_OBSERVATION, START_TOOL

    rm = ThemisRewardModel(rm_dir, max_rounds=1, max_new_tokens=60, batch_size=64, device="cpu")
    tok = rm.tokenizer
    qs = task.split_questions()["rm_test"][:n]
    rng = random.Random(2)
    negs = [task.hard_negative(q, rng) for q in qs]

    def prefix(q: task.Question, answer: str) -> str:
        return (render_user(q.text, answer) + ASSISTANT_HEADER + f"{START_TOOL} Thought: {task.THOUGHT}\n"
                f"Action: {task.ACTION}\nAction Input: {q.start.isoformat()}, {q.n}\n{START_OBSERVATION} "
                f"Observation: {q.answer}\n")

    rows = [tok(prefix(q, a), add_special_tokens=True)["input_ids"] for q, a in
            [(q, q.answer) for q in qs] + list(zip(qs, negs))]
    out = rm.tracer.engine.generate(rows, SamplingParams(max_new_tokens=60, temperature=0.0))
    cont_ids = [out.response_ids[j][out.mask[j].bool()].tolist() for j in range(len(rows))]
    eos = tok.eos_token_id
    scores = rm.score_ids([r + c + ([] if c[-1:] == [eos] else [eos]) for r, c in zip(rows, cont_ids)])
    conts = [tok.decode(c, skip_special_tokens=True) for c in cont_ids]
    k = len(qs)
    return {"n": k, "pairwise_accuracy": sum(a > b for a, b in zip(scores[:k], scores[k:])) / k,
            "verdict_right_on_positives": sum(task.RIGHT in c for c in conts[:k]) / k,
            "verdict_wrong_on_negatives": sum(task.WRONG in c for c in conts[k:]) / k}


def diagnose(rm_dir: str, n: int = 100) -> dict[str, Any]:
    return {"copy_train": copy_accuracy(rm_dir, "rm_train", n), "copy_heldout": copy_accuracy(rm_dir, "rm_test", n),
            "gold_call": gold_call_accuracy(rm_dir, n)}


def oracle_lr_probe(out: Path, seed: int, lrs: list[float], probe_dir: Path,
                    sizes: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    import rltaf

    import align

    held = task.split_questions()["heldout"]
    res = []
    for lr in lrs:
        p = {**rltaf.DEFAULTS, **(sizes or {}), "rl_lr": lr}
        run_dir = probe_dir / (f"seed{seed}-lr{lr:g}" + "".join(f"-{k}{v}" for k, v in sorted((sizes or {}).items())))
        align.train(rltaf.rl_config("grpo", "oracle", out / f"seed{seed}" / "sft-model", out / f"seed{seed}" / "rl_prompts.jsonl",
                                    run_dir, seed, p["rl_steps"], out, p))
        final = sorted((run_dir / "checkpoints").glob("step-*"), key=lambda d: int(d.name.split("-")[1]))[-1]
        ok = rltaf.evaluate_policy(final, held)
        sampled = [json.loads(line)["reward/mean"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        res.append({"seed": seed, "lr": lr, **(sizes or {}), "greedy_heldout_accuracy": sum(ok) / len(ok),
                    "sampled_accuracy_per_10_steps": [sum(sampled[i:i + 10]) / len(sampled[i:i + 10]) for i in range(0, len(sampled), 10)]})
        print(json.dumps(res[-1]), flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rm_dir")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--json", default=None, help="also write the result here")
    ap.add_argument("--oracle-lr", type=float, nargs="*", default=[], help="also run the oracle lr probe at these lrs")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--probe-dir", default="runs/rltaf-lr-probe")
    ap.add_argument("--probe-set", nargs="*", default=[], metavar="KEY=INT", help="probe sizes, e.g. group_size=16 rl_steps=80")
    ap.add_argument("--skip-rm", action="store_true", help="only the oracle probe")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    out = {} if args.skip_rm else diagnose(args.rm_dir, args.n)
    if args.oracle_lr:
        sizes = {k: int(v) for k, v in (kv.split("=", 1) for kv in args.probe_set)}
        out["oracle_lr_probe"] = oracle_lr_probe(Path(args.rm_dir).parent, args.seed, args.oracle_lr, Path(args.probe_dir), sizes)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
