"""Why does GRPO with the oracle reward not improve the RLTAF policy? Step-by-step instruments.

One oracle GRPO run (`align.train`, the settings of examples/rltaf.py unless overridden) from a finished run's
SFT model, with a checkpoint after every step. Then, for every checkpoint, measured outside the trainer with a
plain `transformers` forward (independent of the trainer's log-prob code):

- greedy held-out accuracy (what the experiment reports);
- the exact expected sampled accuracy on the held-out questions: mean over questions of
  p(right answer + EOS | question) under the policy at temperature 1, i.e. GRPO's objective E[reward]
  computed exactly rather than from 32 samples;
- for the samples of step k (from completions.jsonl): the mean change of their sequence log-prob from
  checkpoint k-1 to k, separately for rewarded (correct) and unrewarded samples: a policy gradient step must
  raise the former relative to the latter;
- the share of held-out questions whose greedy answer is right but whose p(right answer) < 0.5, and the
  mean per-question probability of the greedy answer (how peaked the policy is).

    python examples/rltaf_oracle_probe.py runs/rltaf --seed 1 --dir runs/rltaf-oracle-probe [--set rl_lr=1e-4 ...]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rltaf  # noqa: E402
import rltaf_task as task  # noqa: E402


def seq_logprobs(model, tok, prompts: Sequence[str], completions: Sequence[str], eos: Sequence[bool]) -> list[float]:
    """log p(completion [+ EOS] | prompt), teacher-forced, one row at a time in small batches (no padding
    subtleties: rows are grouped by length)."""
    import torch

    rows = []
    for p, c, e in zip(prompts, completions, eos):
        pi = tok(p, add_special_tokens=False).input_ids
        ci = tok(c, add_special_tokens=False).input_ids + ([tok.eos_token_id] if e else [])
        rows.append((pi, ci))
    out = [0.0] * len(rows)
    by_len: dict[tuple[int, int], list[int]] = {}
    for i, (pi, ci) in enumerate(rows):
        by_len.setdefault((len(pi), len(ci)), []).append(i)
    with torch.no_grad():
        for (lp, lc), idx in by_len.items():
            for lo in range(0, len(idx), 256):
                chunk = idx[lo:lo + 256]
                ids = torch.tensor([rows[i][0] + rows[i][1] for i in chunk])
                logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
                tgt = ids[:, lp:]
                got = logp[:, lp - 1:lp + lc - 1].gather(-1, tgt.unsqueeze(-1)).squeeze(-1).sum(-1)
                for i, v in zip(chunk, got.tolist()):
                    out[i] = v
    return out


def measure(ckpt: Path, held: Sequence[task.Question]) -> dict[str, Any]:
    import math

    from align.commands.diversity import load_model

    model, tok = load_model(ckpt, "cpu")
    greedy = rltaf.evaluate_policy(ckpt, held)
    lp = seq_logprobs(model, tok, [q.text for q in held], [q.answer for q in held], [True] * len(held))
    probs = [math.exp(v) for v in lp]
    return {"greedy": sum(greedy) / len(held), "expected_sampled": sum(probs) / len(probs),
            "greedy_right_p_below_half": sum(g and p < 0.5 for g, p in zip(greedy, probs)) / len(held)}


def grad_sign_agreement(sft_dir: Path, run_dir: Path, group_size: int = 4) -> float:
    """After ONE step: the share of weights (|gradient| > 1e-6) that moved opposite the sign of an independently
    computed gradient of -sum_i A_i log p(sample_i) / tokens (A: group-standardised reward). AdamW's first step
    is lr * sign(gradient), so a right gradient gives 1.0."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m0 = AutoModelForCausalLM.from_pretrained(str(sft_dir)).float()
    m1 = AutoModelForCausalLM.from_pretrained(str(run_dir / "checkpoints" / "step-000001")).float()
    tok = AutoTokenizer.from_pretrained(str(sft_dir))
    rows = [r for r in map(json.loads, (run_dir / "completions.jsonl").read_text().splitlines()) if r["step"] == 1]
    r = torch.tensor([x["reward"] for x in rows]).view(-1, group_size)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).view(-1)
    loss, ntok = torch.zeros(()), 0
    for x, a in zip(rows, adv):
        p = tok(x["prompt"], add_special_tokens=False).input_ids
        c = tok(x["completion"], add_special_tokens=False).input_ids + ([tok.eos_token_id] if len(x["completion"]) < 12 else [])
        logp = torch.log_softmax(m0(input_ids=torch.tensor([p + c])).logits.float(), -1)[0, len(p) - 1:-1]
        loss = loss - a * logp.gather(-1, torch.tensor(c)[:, None]).sum()
        ntok += len(c)
    (loss / ntok).backward()
    agree = total = 0
    for p0, p1 in zip(m0.parameters(), m1.parameters()):
        step = p1.detach() - p0.detach()
        sel = (p0.grad.abs() > 1e-6) & (step != 0)
        agree += int((step.sign() == -p0.grad.sign())[sel].sum())
        total += int(sel.sum())
    return agree / max(1, total)


def random_sign_step(sft_dir: Path, eps: float, seed: int, tmp: Path) -> dict[str, Any]:
    """The held-out measurements after moving every weight by +-eps in random signs: a step of the same size as
    AdamW's first one (lr * sign(gradient)), in no particular direction."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(sft_dir))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for q in model.parameters():
            q.add_(eps * (torch.randint(0, 2, q.shape, generator=gen) * 2 - 1).to(q.dtype))
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(sft_dir, tmp)
    model.save_pretrained(str(tmp))
    return measure(tmp, task.split_questions()["heldout"])


def probe(out: Path, seed: int, probe_dir: Path, sizes: dict[str, Any], every: int = 1) -> dict[str, Any]:
    import align
    from align.commands.diversity import load_model

    p = {**rltaf.DEFAULTS, **sizes}
    held = task.split_questions()["heldout"][:p["heldout"]]
    sft_dir = out / f"seed{seed}" / "sft-model"
    cfg = rltaf.rl_config("grpo", "oracle", sft_dir, out / f"seed{seed}" / "rl_prompts.jsonl", probe_dir, seed,
                          p["rl_steps"], out, p)
    cfg["checkpoint"] = {"every": 1, "keep_last": p["rl_steps"] + 1, "save_final": True, "overwrite": True,
                         "save_optimizer": False}
    align.train(cfg)
    ckpts = {int(d.name.split("-")[1]): d for d in (probe_dir / "checkpoints").glob("step-*")}
    ckpts[0] = sft_dir
    comps = [json.loads(line) for line in (probe_dir / "completions.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (probe_dir / "metrics.jsonl").read_text().splitlines()]
    steps = []
    for k in sorted(ckpts):
        rec: dict[str, Any] = {"step": k, **(measure(ckpts[k], held) if k % every == 0 or k == max(ckpts) else {})}
        rows = [c for c in comps if c["step"] == k + 1]  # the samples drawn by checkpoint k, trained on at step k+1
        if rows and k + 1 in ckpts:
            prompts, texts = [r["prompt"] for r in rows], [r["completion"] for r in rows]
            # a completion shorter than max_new_tokens ended with EOS (the decoded text drops it)
            eos = [len(t) < 12 for t in texts]
            before = seq_logprobs(*load_model(ckpts[k], "cpu"), prompts, texts, eos)
            after = seq_logprobs(*load_model(ckpts[k + 1], "cpu"), prompts, texts, eos)
            d = [a - b for a, b in zip(after, before)]
            right = [x for x, r in zip(d, rows) if r["reward"] > 0]
            wrong = [x for x, r in zip(d, rows) if r["reward"] <= 0]
            m = metrics[k]
            rec.update({"next_batch_sampled_acc": len(right) / len(rows),
                        "dlogp_right": sum(right) / len(right) if right else None,
                        "dlogp_wrong": sum(wrong) / len(wrong) if wrong else None,
                        "zero_var_groups": m["grpo/zero_variance_groups"], "grad_norm": m["train/grad_norm"],
                        "entropy": m["policy/entropy"], "loss": m["loss/policy"]})
        steps.append(rec)
        print(json.dumps(rec), flush=True)
    return {"seed": seed, "sizes": sizes, "steps": steps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="a finished examples/rltaf.py run (its seedN/sft-model is the start)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", default="runs/rltaf-oracle-probe")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", default=None)
    ap.add_argument("--random-step", type=float, default=0.0, metavar="EPS",
                    help="only measure the SFT model after a random-sign step of EPS per weight (2 draws)")
    ap.add_argument("--grad-sign", default=None, metavar="RUN_DIR",
                    help="only check a finished 1-step run (--set rl_steps=1) against an independent gradient")
    ap.add_argument("--every", type=int, default=1, help="held-out measurements every this many steps")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if args.random_step:
        for draw in (0, 1):
            print(json.dumps(random_sign_step(Path(args.out) / f"seed{args.seed}" / "sft-model", args.random_step, draw,
                                              Path(args.dir) / "random-step")))
        return 0
    if args.grad_sign:
        print(json.dumps({"sign_agreement": grad_sign_agreement(Path(args.out) / f"seed{args.seed}" / "sft-model",
                                                                Path(args.grad_sign))}))
        return 0
    sizes = {}
    for kv in args.set:
        k, _, v = kv.partition("=")
        sizes[k] = type(rltaf.DEFAULTS[k])(v)
    res = probe(Path(args.out), args.seed, Path(args.dir), sizes, args.every)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
