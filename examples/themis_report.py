"""The figure and the printed table of examples/themis_generative.py (results.json's summary)."""
from __future__ import annotations

from pathlib import Path


def plot(summary: dict, groups, path: Path) -> None:
    """Pairwise accuracy per test split (bars: mean over seeds, dots: seeds) and Themis' valid-call share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = summary["runs"]
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    series = [(v, "accuracy") for v in ("plain", "themis") if v in runs] + ([("themis", "valid_call_share"), ("themis", "gold_observation_share")] if "themis" in runs else [])
    width = 0.8 / len(series)
    for k, (v, key) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        vals = [[100 * r["eval"][g][key] for r in runs[v]] for g in groups]
        label = {"accuracy": f"{v} RM: pairwise accuracy", "valid_call_share": "themis: valid first call",
                 "gold_observation_share": "themis: observation = gold"}[key]
        ax.bar(xs, [sum(x) / len(x) for x in vals], width, label=label, alpha=0.8)
        for x, vs in zip(xs, vals):
            ax.scatter([x] * len(vs), vs, color="black", s=8, zorder=3)
    ax.axhline(50, color="grey", lw=0.8, ls=":")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("% of test pairs / samples")
    ax.set_ylim(0, 125)
    ax.legend(fontsize=7, loc="upper center", ncol=2)
    ax.set_title("Generative Themis vs plain RM (same 4x128 backbone, steps, pairs); dots: seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(summary: dict, groups) -> None:
    import statistics

    runs = summary["runs"]
    for g in groups:
        line = f"{g:<12}"
        for v in runs:
            acc = [100 * r["eval"][g]["accuracy"] for r in runs[v]]
            line += f"  {v} acc {statistics.mean(acc):.1f} [{' '.join(f'{a:.1f}' for a in acc)}]"
            if v == "themis":
                for key in ("valid_call_share", "gold_observation_share"):
                    vals = [100 * r["eval"][g][key] for r in runs[v]]
                    line += f"  {key} {statistics.mean(vals):.1f}"
        if "paired" in summary:
            pc = summary["paired"][g]
            ci = pc["ci95"]
            line += f"  diff {100 * pc['mean_diff']:+.1f}" + (f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "")
        print(line)
    print(f"total {summary['wall_s']:.0f} s wall, {summary['cpu_s']:.0f} s CPU")
