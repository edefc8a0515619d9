"""Statistics, tables and the plot of examples/cd_rlhf.py.

"shown": the 95% t-interval of the paired (by seed) mean difference eta - 0 excludes 0 on the better side.
"not lower" (reward): that interval lies above -REWARD_MARGIN, a margin fixed before the runs.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Sequence

import cd_rlhf_task as task

REWARD_MARGIN = 0.05
# metric -> +1 when higher = more diverse (or more reward), -1 when lower = more diverse
DIRECTION = {"reward": 1, "diversity": 1, "ead": 1, "self_bleu": -1, "sentbert": -1, "distinct_1": 1,
             "distinct_2": 1, "favourite_share": -1, "collapse": -1}
SECONDARY = ("ead", "self_bleu", "sentbert")


def t_interval(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the two-sided t-interval of the mean of `diffs` (n >= 2)."""
    from scipy import stats

    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return mean, -math.inf, math.inf
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half


def oracle_references(n_groups: int, n: int, draws: int = 5) -> dict[str, dict[str, float]]:
    """Diversity of policies uniform over the reward-optimal words (favourites) and over the allowed words,
    under the evaluation protocol (same prompts x samples), mean over `draws` samplings."""
    from align.diversity import diversity

    out = {}
    for name, words in (("favourites_uniform", task.FAVOURITES), ("allowed_uniform", task.ALLOWED),
                        ("all_words_uniform", task.WORDS)):
        vals = [diversity(task.oracle_groups(words, n_groups, n, seed), sentbert=False) for seed in range(draws)]
        out[name] = {k: statistics.fmean(v[k] for v in vals) for k in vals[0]}
        groups = task.oracle_groups(words, n_groups, n, 0)
        flat = [c for g in groups for c in g]
        out[name]["reward"] = statistics.fmean(task.FavouriteWordsReward()([""] * len(flat), flat))
    return out


def collapse(div: float, oracles: dict[str, dict[str, float]]) -> float:
    """0 = as spread as a policy uniform over all allowed (near-optimal) words; 1 = as narrow as one uniform
    over the reward-optimal favourites; > 1 = narrower than even the reward-optimal set requires."""
    hi, lo = oracles["allowed_uniform"]["diversity"], oracles["favourites_uniform"]["diversity"]
    return (hi - div) / (hi - lo)


DIVERGED_REWARD = -1.9  # a final evaluation this low means (nearly) every sample broke the five-word format


def diverged(run: dict[str, Any]) -> bool:
    return run["final"]["reward"] <= DIVERGED_REWARD


def compare(results: dict[str, Any], exclude_diverged: bool = False) -> dict[str, Any]:
    """Paired (by seed) differences eta - 0 of the final checkpoints' metrics, with the acceptance verdict.

    exclude_diverged: drop the pairs where either run diverged (a secondary analysis, chosen after the runs)."""
    by = {(r["eta"], r["seed"]): r["final"] for r in results["runs"] if not (exclude_diverged and diverged(r))}
    out: dict[str, Any] = {}
    for eta in results["etas"]:
        seeds = [s for s in results["seeds"] if (0.0, s) in by and (eta, s) in by]  # pairs whose both runs finished
        if eta == 0 or not seeds:
            continue
        row: dict[str, Any] = {}
        for key in DIRECTION:
            if key == "collapse":
                diffs = [collapse(by[(eta, s)]["diversity"], results["oracles"])
                         - collapse(by[(0.0, s)]["diversity"], results["oracles"]) for s in seeds]
            elif key in by[(0.0, seeds[0])]:
                diffs = [by[(eta, s)][key] - by[(0.0, s)][key] for s in seeds]
            else:
                continue
            mean, lo, hi = t_interval(diffs)
            better = lo > 0 if DIRECTION[key] > 0 else hi < 0
            worse = hi < 0 if DIRECTION[key] > 0 else lo > 0
            row[key] = {"mean": mean, "low": lo, "high": hi, "better_shown": better, "worse_shown": worse}
        reward_ok = row["reward"]["low"] > -REWARD_MARGIN
        n_secondary = sum(row[k]["better_shown"] for k in SECONDARY if k in row)
        row["reward_not_lower"] = reward_ok
        row["accepted"] = bool(row["diversity"]["better_shown"] and n_secondary >= 2 and reward_ok)
        row["n_pairs"] = len(seeds)
        out[f"{eta:g}"] = row
    return out


def matched_reward_gain(results: dict[str, Any], margin: float = REWARD_MARGIN) -> dict[str, Any]:
    """Pareto check per seed: eta's final Diversity minus the highest Diversity of any eta = 0 checkpoint (or the
    SFT start) whose reward is at least eta's final reward - margin. Positive: plain PPO never reached that
    reward with that much diversity. Pairs where no such eta = 0 checkpoint exists are counted apart."""
    sft = {m["seed"]: m for m in results["sft_models"]}
    base = {r["seed"]: [sft[r["seed"]]] + r["checkpoints"] for r in results["runs"] if r["eta"] == 0}
    out = {}
    for eta in results["etas"]:
        if eta == 0:
            continue
        diffs, unmatched = [], 0
        for r in results["runs"]:
            if r["eta"] != eta or r["seed"] not in base:
                continue
            f = r["final"]
            cands = [c["diversity"] for c in base[r["seed"]] if c["reward"] >= f["reward"] - margin
                     and c["reward"] > DIVERGED_REWARD]
            if cands:
                diffs.append(f["diversity"] - max(cands))
            else:
                unmatched += 1
        mean, lo, hi = t_interval(diffs) if diffs else (math.nan, math.nan, math.nan)
        out[f"{eta:g}"] = {"mean": mean, "low": lo, "high": hi, "n": len(diffs), "unmatched": unmatched}
    return out


def _ms(values: Sequence[float]) -> str:
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.4f} ± {s:.4f}"


def format_tables(results: dict[str, Any]) -> str:
    keys = [k for k in ("reward", "diversity", "ead", "self_bleu", "sentbert", "distinct_1", "favourite_share",
                        "allowed_share", "invalid_share") if k in results["runs"][0]["final"]]
    lines = ["Final checkpoint, mean ± sample std over seeds " + ", ".join(map(str, results["seeds"])) + ":", "",
             "| setting | " + " | ".join(keys) + " | collapse |", "|" + "---|" * (len(keys) + 2)]
    sft = results["sft_models"]
    lines.append("| SFT start | " + " | ".join(_ms([m[k] for m in sft]) if k in sft[0] else "-" for k in keys)
                 + f" | {_ms([collapse(m['diversity'], results['oracles']) for m in sft])} |")
    for eta in results["etas"]:
        runs = [r for r in results["runs"] if r["eta"] == eta]
        for label, subset in ((f"eta = {eta:g}", runs), (f"eta = {eta:g} without diverged",
                                                        [r for r in runs if not diverged(r)])):
            if not subset or (label.endswith("diverged") and len(subset) == len(runs)):
                continue
            rows = [r["final"] for r in subset]
            lines.append(f"| {label} | " + " | ".join(_ms([r[k] for r in rows]) for k in keys)
                         + f" | {_ms([collapse(r['diversity'], results['oracles']) for r in rows])} |")
    for name, ref in results["oracles"].items():
        lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(f"{ref[k]:.4f}" if k in ref else "-" for k in keys)
                     + f" | {collapse(ref['diversity'], results['oracles']):.2f} |")
    bad = [f"eta = {r['eta']:g} seed {r['seed']}" for r in results["runs"] if diverged(r)]
    lines += ["", f"Diverged runs (final evaluation reward <= {DIVERGED_REWARD}): " + (", ".join(bad) or "none")]
    for title, key in (("all pairs", "comparison"), ("pairs without a diverged run (secondary, chosen after the runs)",
                                                     "comparison_excluding_diverged")):
        comp = results.get(key) or {}
        if not comp:
            continue
        ks = [k for k in ("reward", "diversity", "ead", "self_bleu", "sentbert", "favourite_share", "collapse")
              if k in next(iter(comp.values()))]
        lines += ["", f"Paired difference eta - 0, {title} (mean [95% t-interval]); * = better shown, ! = worse "
                  f"shown; reward not lower = interval above -{REWARD_MARGIN}:", "",
                  "| eta | pairs | " + " | ".join(ks) + " | reward not lower | accepted |", "|" + "---|" * (len(ks) + 4)]
        for eta, row in comp.items():
            cells = [f"{row[k]['mean']:+.4f} [{row[k]['low']:+.4f}, {row[k]['high']:+.4f}]"
                     + ("*" if row[k]["better_shown"] else "!" if row[k]["worse_shown"] else "") for k in ks]
            lines.append(f"| {eta} | {row['n_pairs']} | " + " | ".join(cells) + f" | {'yes' if row['reward_not_lower'] else 'no'} | "
                         f"{'yes' if row['accepted'] else 'no'} |")
    matched = results.get("matched_reward") or {}
    if matched:
        lines += ["", "Pareto check: eta's final Diversity minus the best Diversity of any eta = 0 checkpoint (or the SFT "
                  f"start) of the same seed with reward >= eta's final reward - {REWARD_MARGIN} (mean [95% t-interval]):",
                  "", "| eta | pairs matched | no eta = 0 checkpoint that high | Diversity gain at matched reward |",
                  "|---|---|---|---|"]
        for eta, m in matched.items():
            lines.append(f"| {eta} | {m['n']} | {m['unmatched']} | {m['mean']:+.4f} [{m['low']:+.4f}, {m['high']:+.4f}] |")
    lines += ["", "Curiosity measurements per run (mean over seeds; per-step means over the run):", "",
              "| eta | gate rate | ICM loss first -> last | bonus per sequence (std) | score std | bonus / score std |",
              "|---|---|---|---|---|---|"]
    for eta in results["etas"]:
        if eta == 0:
            continue
        hs = [r["history"] for r in results["runs"] if r["eta"] == eta]

        def avg(key, hs=hs):
            vals = [h[key] for hist in hs for h in hist if h.get(key) is not None]
            return statistics.fmean(vals) if vals else float("nan")

        first = statistics.fmean(hist[0].get("curiosity/icm_loss", float("nan")) for hist in hs)
        last = statistics.fmean(hist[-1].get("curiosity/icm_loss", float("nan")) for hist in hs)
        bonus, score = avg("curiosity/seq_bonus_std"), avg("reward/std")
        lines.append(f"| {eta:g} | {avg('curiosity/gate_rate'):.3f} | {first:.3f} -> {last:.3f} | {bonus:.4f} | "
                     f"{score:.4f} | {bonus / score if score else float('nan'):.3f} |")
    lines += ["", "Pareto view: mean over seeds (diverged runs left out) at each evaluated checkpoint (reward / Diversity):", "",
              "| eta | " + " | ".join(f"step {c['step']}" for c in results["runs"][0]["checkpoints"]) + " |",
              "|" + "---|" * (len(results["runs"][0]["checkpoints"]) + 1)]
    for eta in results["etas"]:
        runs = [r for r in results["runs"] if r["eta"] == eta and not diverged(r)]
        if not runs:
            lines.append(f"| {eta:g} | every run diverged |")
            continue
        cells = []
        for i in range(len(runs[0]["checkpoints"])):
            rew = statistics.fmean(r["checkpoints"][i]["reward"] for r in runs)
            div = statistics.fmean(r["checkpoints"][i]["diversity"] for r in runs)
            cells.append(f"{rew:.3f} / {div:.4f}")
        lines.append(f"| {eta:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> Path | None:
    """Diversity against reward over checkpoints (Pareto view), train reward, gate rate and ICM loss."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    cmap = plt.get_cmap("viridis")
    etas = results["etas"]
    sft = results["sft_models"]
    start = (statistics.fmean(m["reward"] for m in sft), statistics.fmean(m["diversity"] for m in sft))
    ax = axes[0]
    for i, eta in enumerate(etas):
        runs = [r for r in results["runs"] if r["eta"] == eta and not diverged(r)]
        if not runs:
            continue
        pts = [start] + [(statistics.fmean(r["checkpoints"][j]["reward"] for r in runs),
                          statistics.fmean(r["checkpoints"][j]["diversity"] for r in runs))
                         for j in range(len(runs[0]["checkpoints"]))]
        color = "black" if eta == 0 else cmap(i / max(len(etas) - 1, 1))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=color, label=f"eta={eta:g}")
        ax.scatter([r["final"]["reward"] for r in runs], [r["final"]["diversity"] for r in runs], color=color, s=8, alpha=0.4)
    for name, marker in (("favourites_uniform", "*"), ("allowed_uniform", "s")):
        ref = results["oracles"][name]
        ax.scatter([ref["reward"]], [ref["diversity"]], marker=marker, s=80, color="tab:red", label=name.replace("_", " "))
    ax.set_xlabel("reward (higher = better)")
    ax.set_ylabel("Diversity (released counting)")
    gone = [f"eta={r['eta']:g} seed {r['seed']}" for r in results["runs"] if diverged(r)]
    ax.set_title("Diversity vs reward over checkpoints (dots: final, per seed)\n"
                 + (f"diverged, not drawn: {', '.join(gone)}" if gone else ""), fontsize=8)
    ax.legend(fontsize=6)
    for ax, key, title in ((axes[1], "reward/mean", "train reward"), (axes[2], "curiosity/gate_rate", "gate rate"),
                           (axes[3], "curiosity/icm_loss", "ICM loss")):
        for i, eta in enumerate(etas):
            hs = [r["history"] for r in results["runs"] if r["eta"] == eta and not diverged(r)]
            if not hs:
                continue
            steps = [h["step"] for h in hs[0]]
            vals = [[h.get(key) for h in hist] for hist in hs]
            if any(v is None for row in vals for v in row):
                continue
            mean = [statistics.fmean(row[t] for row in vals) for t in range(min(map(len, vals)))]
            width = 20  # a trailing 20-step mean: the per-step batch mean is noisy
            mean = [statistics.fmean(mean[max(0, t - width + 1):t + 1]) for t in range(len(mean))]
            color = "black" if eta == 0 else cmap(i / max(len(etas) - 1, 1))
            ax.plot(steps[:len(mean)], mean, color=color, label=f"eta={eta:g}")
        ax.set_title(title + " (mean over seeds, 20-step mean)", fontsize=9)
        ax.set_xlabel("PPO step")
        ax.legend(fontsize=6)
    fig.suptitle(f"CD-RLHF toy: {len(results['seeds'])} seeds, {results['steps']} PPO steps, kl_coef "
                 f"{results['kl_coef']}, eval {results['eval_prompts']} prompts x {results['n_samples']} at T=1", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
