"""One GRPO arm (or several) of examples/rltaf.py on a tuning seed, from that seed's SFT model, with the RMs of a
finished `--rm-only` run: held-out greedy and exact expected accuracy, CPU seconds and the reward-hacking curve
(RM score vs truth of the policy's samples per step). A check before a final run, on seeds it will not use.

    python examples/rltaf_arm_check.py runs/rltaf-tool3 --seed 10 --arms themis plain --json X.json --set rl_steps=60 ...
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rltaf  # noqa: E402
import rltaf_task as task  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--arms", nargs="+", default=["themis", "plain", "oracle"])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rltaf._one_thread()
    p = dict(rltaf.DEFAULTS)
    for kv in args.set:
        k, _, v = kv.partition("=")
        p[k] = type(p[k])(v)
    out = Path(args.out)
    held = task.split_questions()["heldout"][:p["heldout"]]
    sft_dir = rltaf.warm_start(out, args.seed, p)
    res = {"seed": args.seed, "params": p, "sft": {"greedy": sum(rltaf.evaluate_policy(sft_dir, held)) / len(held),
                                                   "expected": rltaf.expected_accuracy(sft_dir, held)}}
    print("sft", json.dumps(res["sft"]), flush=True)
    for arm in args.arms:
        r = rltaf.run_arm(out, args.seed, arm, sft_dir, p)
        r["greedy"] = sum(rltaf.evaluate_policy(Path(r["final"]), held)) / len(held)
        r["expected"] = rltaf.expected_accuracy(Path(r["final"]), held)
        shutil.rmtree(Path(r["run_dir"]) / "checkpoints", ignore_errors=True)
        res[arm] = r
        c = r["curve"]
        ra = [x["rm_ranking_accuracy"] for x in c if x.get("rm_ranking_accuracy") is not None]
        print(arm, json.dumps({"greedy": r["greedy"], "expected": r["expected"], "cpu_s": r["cpu_s"], "wall_s": r["wall_s"],
                               "truth_first_last": [c[0]["true_accuracy"], c[-1]["true_accuracy"]] if c else None,
                               "ranking_mean": sum(ra) / len(ra) if ra else None,
                               "tool_blind": sum(x.get("tool_blind", 0) for x in c)}), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
