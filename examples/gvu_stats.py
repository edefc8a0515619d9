"""Paired statistics and the summary tables of the GvU experiment (examples/gvu_toy.py runs).

"Shown" (issue 15): the 95% t-interval of the paired (by seed) mean difference after - before excludes 0;
t with n - 1 degrees of freedom. A skill is "below its before-value beyond its CI" when its interval lies
entirely below 0.

    python examples/gvu_stats.py runs/gvu/policy-kl0.03 runs/gvu/teacher-kl0.03 ... --out runs/gvu/summary
writes summary.json, summary.md (the before/after per-skill table per run and the beta sweep) and a plot
(gvu.png, or --plot PATH; skipped with a message without matplotlib).
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


def plot(runs: Sequence[dict], path: Path) -> Path | None:
    """Left: per-skill GenEval-style accuracy before / after for each beta-0.03 run; right: the overall gain
    (after - before, 95% t-interval) against beta per scorer. None (with a message) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sums = [(r, run_summary(r)) for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    keys = ("overall", *TASKS)
    base = [r for r in sums if abs(r[0]["kl_coef"] - min(x[0]["kl_coef"] for x in sums)) < 1e-12]
    width = 0.8 / (1 + len(base))
    xs = range(len(keys))
    before = [statistics.fmean(base[0][1][k]["before"]) for k in keys]
    left.bar([x - 0.4 + width / 2 for x in xs], before, width, label="before", color="0.6")
    for j, (r, s) in enumerate(base, start=1):
        after = [statistics.fmean(s[k]["after"]) for k in keys]
        lo = [s[k]["diff"]["mean"] - s[k]["diff"]["lo"] for k in keys]
        left.bar([x - 0.4 + width / 2 + j * width for x in xs], after, width, yerr=lo, capsize=2,
                 label=f"after ({label(r)})")
    left.set_xticks(list(xs), keys, rotation=30, ha="right")
    left.set_ylabel("GenEval-style accuracy (mean over seeds)")
    left.set_ylim(0, 1.05)
    left.legend(fontsize=8)
    left.set_title("per skill; error bar = half the 95% t-interval of after - before", fontsize=9)
    for scorer in sorted({r["scorer"] for r, _ in sums}):
        pts = sorted((r["kl_coef"], s["overall"]["diff"]) for r, s in sums if r["scorer"] == scorer)
        betas = [b for b, _ in pts]
        means = [d["mean"] for _, d in pts]
        err = [[d["mean"] - d["lo"] for _, d in pts], [d["hi"] - d["mean"] for _, d in pts]]
        right.errorbar(betas, means, yerr=err, marker="o", capsize=3, label=f"scorer {scorer}")
    right.axhline(0, color="0.5", lw=0.8)
    right.set_xscale("log")
    betas_all = sorted({r["kl_coef"] for r, _ in sums})
    right.set_xticks(betas_all, [f"{b:g}" for b in betas_all])
    right.minorticks_off()
    right.set_xlabel("beta (KL coefficient)")
    right.set_ylabel("overall after - before (95% t-interval)")
    right.legend(fontsize=8)
    right.set_title("the cost of a larger beta", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders of examples/gvu_toy.py (each with results.json)")
    ap.add_argument("--out", default="runs/gvu/summary")
    ap.add_argument("--plot", default=None, help="also write the plot here (default: OUT/gvu.png)")
    args = ap.parse_args(argv)
    runs = [json.loads((Path(p) / "results.json").read_text()) for p in args.runs]
    runs = [r for r in runs if r.get("seeds")]
    text = tables(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {label(r): run_summary(r) for r in runs}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(text + "\n")
    plot(runs, Path(args.plot) if args.plot else out / "gvu.png")
    print(text)
    return summary


if __name__ == "__main__":
    main()
