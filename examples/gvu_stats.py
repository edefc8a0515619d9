"""Paired statistics and the summary tables of the GvU experiment (examples/gvu_toy.py runs).

"Shown" (issue 15): the 95% t-interval of the paired (by seed) mean difference after - before excludes 0;
t with n - 1 degrees of freedom. A skill is "below its before-value beyond its CI" when its interval lies
entirely below 0.

    python examples/gvu_stats.py runs/gvu/policy-kl0.03 runs/gvu/teacher-kl0.03 ... --out runs/gvu/summary
writes summary.json and summary.md (the before/after per-skill table per run and the beta sweep).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Sequence

# Two-sided 95% quantiles t_{0.975, df} of Student's t, df = 1..30 (standard tables; tests check them against
# the t density integrated numerically).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def paired_ci(before: Sequence[float], after: Sequence[float]) -> dict:
    """Mean of after - before over seeds and its 95% t-interval (n - 1 df); needs >= 2 seeds for an interval."""
    if len(before) != len(after) or not before:
        raise ValueError(f"paired_ci needs equal, non-empty samples, got {len(before)} and {len(after)}")
    d = [a - b for a, b in zip(after, before)]
    mean = statistics.fmean(d)
    if len(d) < 2:
        return {"mean": mean, "lo": float("nan"), "hi": float("nan"), "n": len(d)}
    half = T975[min(len(d) - 1, len(T975)) - 1] * statistics.stdev(d) / math.sqrt(len(d))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": len(d)}


def verdict(ci: dict) -> str:
    if not ci["lo"] == ci["lo"]:
        return ""
    return "up (shown)" if ci["lo"] > 0 else "down (shown)" if ci["hi"] < 0 else "n.s."


def _ms(values: Sequence[float]) -> str:
    return f"{statistics.fmean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def _ci(ci: dict) -> str:
    return f"{ci['mean']:+.3f} [{ci['lo']:+.3f}, {ci['hi']:+.3f}]"


def run_summary(results: dict) -> dict:
    """Per metric of one run: before / after over seeds and the paired difference with its CI."""
    seeds = list(results["seeds"].values())
    out: dict = {}
    for key in ("overall", *TASKS, "objects_per_image"):
        b = [s["before"]["generation"][key] for s in seeds]
        a = [s["after"]["generation"][key] for s in seeds]
        out[key] = {"before": b, "after": a, "diff": paired_ci(b, a)}
    b = [s["before"]["understanding"]["overall"] for s in seeds]
    a = [s["after"]["understanding"]["overall"] for s in seeds]
    out["understanding"] = {"before": b, "after": a, "diff": paired_ci(b, a)}
    out["kl_last"] = [s["kl_last"] for s in seeds]
    out["reward_first"] = [s["reward_first"] for s in seeds]
    out["reward_last"] = [s["reward_last"] for s in seeds]
    skills_down = [k for k in TASKS if out[k]["diff"]["hi"] < 0]
    out["accepted"] = bool(out["overall"]["diff"]["lo"] > 0 and not skills_down)
    out["skills_down"] = skills_down
    return out


def label(results: dict) -> str:
    return f"scorer {results['scorer']}, beta {results['kl_coef']:g}"


def tables(runs: Sequence[dict]) -> str:
    sums = [run_summary(r) for r in runs]
    head = "| metric | before | " + " | ".join(f"after ({label(r)}) | after - before, 95% CI" for r in runs) + " |"
    lines = [head, "|---|---|" + "---|---|" * len(runs)]
    for key in ("overall", *TASKS, "objects_per_image", "understanding"):
        cells = [_ms(sums[0][key]["before"])]
        for s in sums:
            cells += [_ms(s[key]["after"]), f"{_ci(s[key]['diff'])} {verdict(s[key]['diff'])}".strip()]
        name = "**GenEval-style overall**" if key == "overall" else "understanding (caption choice)" if key == "understanding" else key
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| run | seeds | overall after - before, 95% CI | final KL (k3) | training reward first -> last step | "
              "understanding after - before | accepted |", "|---|---|---|---|---|---|---|"]
    for r, s in zip(runs, sums):
        lines.append(f"| {label(r)} | {len(r['seeds'])} | {_ci(s['overall']['diff'])} | {_ms(s['kl_last'])} | "
                     f"{_ms(s['reward_first'])} -> {_ms(s['reward_last'])} | {_ci(s['understanding']['diff'])} | "
                     f"{'yes' if s['accepted'] else 'no' + (' (down: ' + ', '.join(s['skills_down']) + ')' if s['skills_down'] else '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders of examples/gvu_toy.py (each with results.json)")
    ap.add_argument("--out", default="runs/gvu/summary")
    args = ap.parse_args(argv)
    runs = [json.loads((Path(p) / "results.json").read_text()) for p in args.runs]
    runs = [r for r in runs if r.get("seeds")]
    text = tables(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {label(r): run_summary(r) for r in runs}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(text + "\n")
    print(text)
    return summary


if __name__ == "__main__":
    main()
