"""Tool use pays off: a tiny policy that calls the calculator beats one that answers directly (docs/tool_use.md).

Task: products of two 3-digit numbers, exact answer (examples/tool_use_task.py). Per seed:
1. a tiny random Llama (nothing downloaded) is pre-trained briefly on a generic copy corpus (the base model);
2. tools arm: SFT on tool-call demonstrations (call the calculator, read the observation, answer), stopped at
   the last check (every 2 steps) where fewer than half of 64 sampled episodes (temperature 1) make a valid
   call; no-tool arm: SFT on direct answers for the same number of steps and examples;
3. GRPO through `align.train` for both arms (dr_grpo, the same budget), the tools arm with `rollout.tools:
   [calculator]` (Hermes format); reward: the exact answer, plus a 0.1 valid-call format term in the tools arm;
4. greedy held-out accuracy of every SFT and final model; paired-by-seed difference with its 95% t-interval.

`python examples/tool_use.py [--seeds 0 1 2] [--out runs/tool_use] [--report docs/experiments/tool_use]`
writes `<report>.json`, `<report>.md` (the table) and `<report>.png` (reward curves, valid-call share).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _one_thread() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


def grpo_config(model: Path, prompts: Path, run_dir: Path, seed: int, tools: bool, args) -> dict[str, Any]:
    import tool_use_task as T

    rollout: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "temperature": 1.0}
    if tools:
        rollout.update({"tools": [T.TOOL], "tool_format": "hermes", "tool_chat_template": "tiny",
                        **T.EVAL_LIMITS, "tool_timeout_s": 10, "tool_workers": 4})
    functions, weights = [T.ExactProduct()], [1.0]
    if tools:  # logged, weight 0 (or the --format-weight term)
        functions.append(T.ValidCall())
        weights.append(args.format_weight)
    return {
        "algorithm": "grpo",
        "model": {"path": str(model)},
        "data": {"path": str(prompts)},
        "rollout": rollout,
        "reward": {"functions": functions, "weights": weights},
        "algo": {"group_size": args.group_size, "advantage": args.advantage, "clip_high": 0.28, "kl_coef": 0.0},
        "train": {"steps": args.steps, "prompts_per_step": args.prompts_per_step, "micro_batch_size": 128,
                  "lr": args.lr, "warmup_steps": 5, "seed": seed},
        "logging": {"run_dir": str(run_dir), "progress": False, "print_every": args.print_every},
        "checkpoint": {"every": 0, "overwrite": True},
    }


def run_seed(seed: int, args, out: Path) -> dict[str, Any]:
    import tool_use_task as T

    import align
    from align.rollouts.tool_formats import TINY_TOOL_CHAT_TEMPLATE, HermesFormat

    t0, c0 = time.perf_counter(), time.process_time()
    train, held = T.split_items(args.n_train, args.n_eval)
    tok = T.build_tokenizer()
    fmt = HermesFormat(tok, TINY_TOOL_CHAT_TEMPLATE)
    root = out / f"seed{seed}"
    base = T.build_base(root / "base", seed)
    rng = random.Random(seed)
    corpus = [T.copy_doc(tok, rng) for _ in range(args.pretrain_steps * 64)]
    T.sft(base, root / "pretrained", corpus, args.pretrain_steps, 64, 3e-3, seed)

    probe = random.Random(seed + 1).sample(train, args.check_prompts)

    def share(model, tok_):  # valid-call share of sampled (temperature 1) episodes on training prompts
        return T.rollout_eval(model, tok_, probe, tools=True, temperature=1.0, seed=seed)["valid_call"]

    tool_sft = T.sft(root / "pretrained", root / "sft-tools", [T.tool_demo(tok, fmt, a, b) for a, b in train],
                     args.max_sft_steps, args.sft_batch, 3e-3, seed, check=share, check_every=args.check_every)
    direct_sft = T.sft(root / "pretrained", root / "sft-direct", [T.direct_demo(tok, a, b) for a, b in train],
                       tool_sft["steps"], args.sft_batch, 3e-3, seed)
    prompts = T.write_prompts(root / "prompts.jsonl", tok, train)
    out_arms: dict[str, Any] = {}
    for arm, tools, sft_out in (("tools", True, tool_sft), ("no_tool", False, direct_sft)):
        sft_dir = root / ("sft-tools" if tools else "sft-direct")
        before = T.evaluate(sft_dir, held, tools)
        t_arm, c_arm = time.perf_counter(), time.process_time()
        result = align.train(grpo_config(sft_dir, prompts, root / f"grpo-{arm}", seed, tools, args))
        grpo_s, grpo_cpu = time.perf_counter() - t_arm, time.process_time() - c_arm
        after = T.evaluate(result.checkpoint, held, tools)
        hist = result.history
        out_arms[arm] = {
            "sft": {k: sft_out[k] for k in ("steps", "examples", "loss")} | (
                {"checks": sft_out["checks"], "valid_call_share_at_stop": sft_out["share_at_stop"]} if tools else {}),
            "heldout_sft": {k: before[k] for k in ("accuracy", "valid_call", "right_call")},
            "heldout_final": {k: after[k] for k in ("accuracy", "valid_call", "right_call")},
            "final_examples": after["examples"],
            "curves": {"accuracy": [h["rewards/exact_product/mean"] for h in hist],
                       **({"valid_call": [h["rewards/valid_call/mean"] for h in hist]} if tools else {})},
            "grpo_wall_s": grpo_s, "grpo_cpu_s": grpo_cpu,
        }
        print(f"seed {seed} {arm:8s} SFT {sft_out['steps']} steps: held-out acc {before['accuracy']:.3f} -> GRPO "
              f"{after['accuracy']:.3f} (valid calls {after['valid_call']:.2f}); {grpo_s:.0f}s", flush=True)
    return {"seed": seed, "arms": out_arms, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    from cd_rlhf_report import t_interval

    acc = {arm: [r["arms"][arm]["heldout_final"]["accuracy"] for r in runs] for arm in ("tools", "no_tool")}
    diffs = [a - b for a, b in zip(acc["tools"], acc["no_tool"])]
    mean, lo, hi = t_interval(diffs)
    first_last = {}
    for r in runs:  # valid-call share of the first and last 10 GRPO steps of the tools arm
        v = r["arms"]["tools"]["curves"]["valid_call"]
        k = max(1, min(10, len(v) // 4))
        first_last[r["seed"]] = (statistics.fmean(v[:k]), statistics.fmean(v[-k:]))
    return {"accuracy": acc, "mean": {arm: statistics.fmean(v) for arm, v in acc.items()},
            "diff": {"per_seed": diffs, "mean": mean, "ci95": [lo, hi], "shown": lo > 0},
            "valid_call_first_last": first_last,
            "valid_call_rises": all(b > a for a, b in first_last.values())}


def markdown(report: dict[str, Any], source: str = "tool_use.json") -> str:
    """The results table (per seed, means, the paired interval), as docs/tool_use.md shows it."""
    runs, s = report["runs"], report["summary"]
    lines = ["| seed | SFT steps (examples) | valid-call share at SFT stop (T=1) | tools: held-out acc SFT -> GRPO "
             "| no tool: held-out acc SFT -> GRPO | tools - no tool | valid-call share, GRPO first -> last 10 steps |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        t, d = r["arms"]["tools"], r["arms"]["no_tool"]
        first, last = s["valid_call_first_last"][str(r["seed"])]  # JSON keys
        lines.append(f"| {r['seed']} | {t['sft']['steps']} ({t['sft']['examples']}) | "
                     f"{t['sft']['valid_call_share_at_stop']:.2f} | {t['heldout_sft']['accuracy']:.3f} -> "
                     f"**{t['heldout_final']['accuracy']:.3f}** | {d['heldout_sft']['accuracy']:.3f} -> "
                     f"**{d['heldout_final']['accuracy']:.3f}** | "
                     f"{t['heldout_final']['accuracy'] - d['heldout_final']['accuracy']:+.3f} | "
                     f"{first:.2f} -> {last:.2f} |")
    diff = s["diff"]
    lines.append(f"| mean | | | **{s['mean']['tools']:.3f}** | **{s['mean']['no_tool']:.3f}** | "
                 f"**{diff['mean']:+.3f}** [{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}] | |")
    verdict = "shown" if diff["shown"] else "not shown"
    head = ("# Tool use: calculator vs no tool (examples/tool_use.py)\n\n"
            f"Generated from {source}; the set-up, "
            "timings and findings: [docs/tool_use.md](../tool_use.md#worked-example-the-calculator-on-3-digit-products)."
            "\n\n")
    return head + "\n".join(lines) + (f"\n\nPaired-by-seed difference (tools - no tool), 95% t-interval (n = {len(runs)}): "
                               f"{diff['mean']:+.3f} [{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}], {verdict}.\n")


def plot(runs: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    colours = {"tools": "tab:blue", "no_tool": "tab:orange"}
    for r in runs:
        for arm, c in colours.items():
            y = r["arms"][arm]["curves"]["accuracy"]
            ax1.plot(range(1, len(y) + 1), y, color=c, alpha=0.8, label=f"{arm}" if r is runs[0] else None)
        v = r["arms"]["tools"]["curves"]["valid_call"]
        ax2.plot(range(1, len(v) + 1), v, label=f"seed {r['seed']}")
    ax1.set_title("GRPO reward (exact-answer accuracy of sampled episodes)")
    ax2.set_title("tools arm: share of episodes with a valid calculator call")
    for ax in (ax1, ax2):
        ax.set_xlabel("GRPO step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def combine(paths: list[Path], rep: Path) -> int:
    """One report from per-seed reports: runs in seed order, the summary recomputed, timings summed."""
    parts = [json.loads(p.read_text()) for p in paths]
    configs = [{k: v for k, v in p["config"].items() if k not in ("seeds", "out", "report", "combine")} for p in parts]
    if any(c != configs[0] for c in configs):
        raise SystemExit("--combine: the reports were run with different settings; combine only runs of one set-up")
    runs = sorted((r for p in parts for r in p["runs"]), key=lambda r: r["seed"])
    if len({r["seed"] for r in runs}) != len(runs):
        raise SystemExit("--combine: a seed appears in two reports")
    report = {"command": " ; ".join(p["command"] for p in parts), "config": {**parts[0]["config"],
              "seeds": [r["seed"] for r in runs]}, "summary": summarize(runs), "runs": runs,
              "machine": {**parts[0]["machine"], "processes": len(parts),
                          "load_average_end": [p["machine"]["load_average_end"] for p in parts]},
              "timing": {"wall_s": max(p["timing"]["wall_s"] for p in parts),
                         "cpu_s": sum(p["timing"]["cpu_s"] for p in parts),
                         "children_cpu_s": sum(p["timing"]["children_cpu_s"] for p in parts)}}
    rep.parent.mkdir(parents=True, exist_ok=True)
    rep.with_suffix(".json").write_text(json.dumps(report, indent=1))
    plot(runs, rep.with_suffix(".png"))
    rep.with_suffix(".md").write_text(markdown(json.loads(json.dumps(report)), rep.with_suffix(".json").name))
    d = report["summary"]["diff"]
    print(f"paired diff {d['mean']:+.3f}, 95% CI [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] "
          f"({'shown' if d['shown'] else 'not shown'}); wrote {rep.with_suffix('.json')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/tool_use")
    ap.add_argument("--report", default="docs/experiments/tool_use", help="writes <report>.json and <report>.png")
    ap.add_argument("--steps", type=int, default=160, help="GRPO steps per arm (80 left seed 1 still climbing)")
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=16)
    ap.add_argument("--advantage", default="dr_grpo",
                    help="algo.advantage: dr_grpo (mean-centred) keeps the format term small; grpo divides by the group std")
    ap.add_argument("--lr", type=float, default=3e-4, help="GRPO learning rate (1e-3 collapses the tools arm)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="policy + observation tokens per episode")
    ap.add_argument("--format-weight", type=float, default=0.1,
                    help="tools arm: weight of the valid-call format term (0: logged only)")
    ap.add_argument("--pretrain-steps", type=int, default=1200, help="copy-corpus steps of the base model (batch 64)")
    ap.add_argument("--max-sft-steps", type=int, default=80)
    ap.add_argument("--sft-batch", type=int, default=32)
    ap.add_argument("--check-prompts", type=int, default=64, help="sampled episodes per SFT stop check")
    ap.add_argument("--check-every", type=int, default=2, help="SFT steps between stop checks")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--print-every", type=int, default=10)
    ap.add_argument("--table-only", action="store_true", help="rewrite <report>.md from <report>.json")
    ap.add_argument("--combine", nargs="+", metavar="JSON",
                    help="merge the reports of seeds run as separate processes (--seeds S --report R_S each, one "
                         "core per process) into <report>.json / .md / .png; nothing is trained")
    args = ap.parse_args(argv)
    rep = Path(args.report)
    if args.table_only:
        rep.with_suffix(".md").write_text(markdown(json.loads(rep.with_suffix(".json").read_text()), rep.with_suffix(".json").name))
        return 0
    if args.combine:
        return combine([Path(p) for p in args.combine], rep)
    _one_thread()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()
    out = Path(args.out)
    runs = [run_seed(s, args, out) for s in args.seeds]
    summary = summarize(runs) if len(runs) >= 2 else None
    usage = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    report = {
        "command": "python examples/tool_use.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": vars(args), "summary": summary, "runs": runs,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": 1,
                    "load_average_end": os.getloadavg()},
        "timing": {"wall_s": time.perf_counter() - t0, "cpu_s": usage.ru_utime + usage.ru_stime,
                   "children_cpu_s": kids.ru_utime + kids.ru_stime},
    }
    rep.parent.mkdir(parents=True, exist_ok=True)
    rep.with_suffix(".json").write_text(json.dumps(report, indent=1))
    plot(runs, rep.with_suffix(".png"))
    if summary:
        rep.with_suffix(".md").write_text(markdown(json.loads(json.dumps(report)), rep.with_suffix(".json").name))
        d = summary["diff"]
        print(f"held-out accuracy: tools {summary['mean']['tools']:.3f}, no tool {summary['mean']['no_tool']:.3f}; "
              f"paired diff {d['mean']:+.3f}, 95% CI [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] "
              f"({'shown' if d['shown'] else 'not shown'})")
    print(f"wrote {rep.with_suffix('.json')} and {rep.with_suffix('.png')}; {report['timing']['wall_s']:.0f}s wall, "
          f"{report['timing']['cpu_s']:.0f}s CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
