"""Statistics, tables and the plot of examples/rltaf.py (plain Python + scipy for the t quantile)."""
from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any, Sequence

import rltaf_task as task

ORACLE_NAME = task.exact_date.__name__  # the mixture labels it by its spec, "rltaf_task:exact_date"


def is_oracle(component: str) -> bool:
    return component.rsplit(":", 1)[-1] == ORACLE_NAME


def machine() -> dict[str, Any]:
    import torch

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def ranking_accuracy(scores: Sequence[float], truth: Sequence[bool]) -> float | None:
    """Over all (right, wrong) sample pairs of one step: the share the RM orders right above wrong (ties
    count half; the AUC). None when the step has no such pair."""
    right = [s for s, t in zip(scores, truth) if t]
    wrong = [s for s, t in zip(scores, truth) if not t]
    if not right or not wrong:
        return None
    wins = sum((r > w) + 0.5 * (r == w) for r in right for w in wrong)
    return wins / (len(right) * len(wrong))


def tool_reads_right(prompt: str, completion: str) -> bool:
    """The completion is the right date in Calendar.day_difference's reading (difference '0'), whether or not it
    is the exact date (e.g. '2017-10-7' or "'2017-10-07'"): the compare trace's blind spot, counted per step."""
    q = task.parse_question(prompt)
    return q is not None and task.compare_observation(completion.strip(), q.answer) == "0"


def hacking_curve(completions_path: Path, arm: str) -> list[dict[str, Any]]:
    """Per logged step, from the trainer's completions.jsonl (every sample): the mean raw RM score, the true
    accuracy of the same samples (the weight-0 oracle), and the RM's ranking accuracy on them."""
    by_step: dict[int, list[dict]] = {}
    if not Path(completions_path).is_file():
        return []
    for line in Path(completions_path).read_text().splitlines():
        row = json.loads(line)
        by_step.setdefault(int(row["step"]), []).append(row)
    curve = []
    for step, rows in sorted(by_step.items()):
        oracle = [k for k in rows[0]["rewards"] if is_oracle(k)]
        if len(oracle) != 1:
            raise ValueError(f"{completions_path}: expected one oracle component among {sorted(rows[0]['rewards'])}")
        truth = [bool(r["rewards"][oracle[0]]) for r in rows]
        rm_names = [k for k in rows[0]["rewards"] if not is_oracle(k)]
        rec: dict[str, Any] = {"step": step, "n": len(rows), "true_accuracy": sum(truth) / len(rows),
                               "tool_blind": sum(not t and tool_reads_right(r["prompt"], r["completion"]) for r, t in zip(rows, truth))}
        if rm_names and arm != "oracle":
            scores = [float(r["rewards"][rm_names[0]]) for r in rows]
            rec["rm_mean"] = sum(scores) / len(scores)
            rec["rm_ranking_accuracy"] = ranking_accuracy(scores, truth)
        curve.append(rec)
    return curve


def t_interval(diffs: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Mean of paired differences and its two-sided t-interval: mean +- t_{n-1} * sd / sqrt(n)."""
    from scipy import stats

    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return {"n": n, "mean": mean, "low": None, "high": None}
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half,
            "shown": bool(mean - half > 0 or mean + half < 0)}


def _acc(correct: Sequence[bool]) -> float:
    return sum(correct) / len(correct)


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    runs = results["runs"]
    per_seed = []
    pooled = {"win": 0, "tie": 0, "lose": 0}
    for r in runs:
        wtl = task.win_tie_lose(r["themis"]["correct"], r["plain"]["correct"])
        for k in pooled:
            pooled[k] += wtl[k]
        per_seed.append({"seed": r["seed"], "sft": _acc(r["sft"]["correct"]),
                         **{arm: _acc(r[arm]["correct"]) for arm in ("themis", "plain", "oracle")},
                         "themis_vs_plain": wtl,
                         "themis_vs_sft": task.win_tie_lose(r["themis"]["correct"], r["sft"]["correct"])})
    n = sum(pooled.values())
    expected = {}
    if all("expected" in r[k] for r in runs for k in ("sft", "themis", "plain", "oracle")):
        # secondary: the exact expected accuracy at temperature 1 (rltaf.expected_accuracy), paired by seed
        ex = [{k: r[k]["expected"] for k in ("sft", "themis", "plain", "oracle")} for r in runs]
        for s in per_seed:
            s["expected"] = ex[per_seed.index(s)]
        expected = {"expected_themis_minus_plain": t_interval([e["themis"] - e["plain"] for e in ex]),
                    "expected_oracle_minus_sft": t_interval([e["oracle"] - e["sft"] for e in ex]),
                    "expected_themis_minus_sft": t_interval([e["themis"] - e["sft"] for e in ex])}
    return {"per_seed": per_seed, **expected,
            "oracle_minus_sft": t_interval([s["oracle"] - s["sft"] for s in per_seed]),
            "themis_minus_plain": t_interval([s["themis"] - s["plain"] for s in per_seed]),
            "themis_minus_sft": t_interval([s["themis"] - s["sft"] for s in per_seed]),
            "plain_minus_sft": t_interval([s["plain"] - s["sft"] for s in per_seed]),
            "oracle_minus_themis": t_interval([s["oracle"] - s["themis"] for s in per_seed]),
            "win_tie_lose_pooled": pooled,
            "win_tie_lose_pooled_rates": {k: v / n for k, v in pooled.items()} if n else {}}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _ci(iv: dict[str, Any]) -> str:
    if iv.get("low") is None:
        return f"{100 * iv['mean']:+.1f} (n={iv['n']}, no interval)"
    return f"{100 * iv['mean']:+.1f} [{100 * iv['low']:+.1f}, {100 * iv['high']:+.1f}]" + (" shown" if iv["shown"] else " not shown")


def format_tables(results: dict[str, Any]) -> str:
    s = results["summary"]
    rms = results["rms"]
    lines = ["RM pairwise accuracy on held-out pairs (%):", "| RM | " + " | ".join(rms["plain"]["eval"]) + " |",
             "|---|" + "---|" * len(rms["plain"]["eval"])]
    for kind in ("plain", "themis"):
        ev = rms[kind]["eval"]
        lines.append(f"| {kind} | " + " | ".join(_pct(v["accuracy"]) + f" (n={v['n']})" for v in ev.values()) + " |")
    tc = rms["themis"].get("trace_checks")
    if tc:
        lines.append(f"Themis on {tc['n']} held-out questions (right answers): first call Calendar.target_day accepted by "
                     f"the tool {_pct(tc.get('tool_accepts_share'))}%; with the question's date and N (output = the right "
                     f"date) {_pct(tc['valid_call_share'])}%")
        for kind in ("right", "hard", "malformed"):
            k = tc.get(kind)
            if k and "verdict_share" in k:
                lines.append(f"- {kind} answers: first call right {_pct(k['valid_call_share'])}%"
                             + (f", second call right {_pct(k['second_call_share'])}%, both {_pct(k['both_calls_share'])}%"
                                if "second_call_share" in k else "")
                             + f", verdict right {_pct(k['verdict_share'])}%, mean score {k['mean_score']:+.2f}"
                             + (f", right answer scored above it {_pct(k['pairwise_vs_right'])}%" if "pairwise_vs_right" in k else ""))
    lines += ["", f"Policy ground-truth accuracy on {results['heldout_questions']} held-out questions (greedy, %):",
              "| seed | SFT | GRPO themis | GRPO plain RM | GRPO oracle | themis vs plain win/tie/lose |", "|---|---|---|---|---|---|"]
    for r in s["per_seed"]:
        w = r["themis_vs_plain"]
        lines.append(f"| {r['seed']} | {_pct(r['sft'])} | {_pct(r['themis'])} | {_pct(r['plain'])} | {_pct(r['oracle'])} | "
                     f"{w['win']} / {w['tie']} / {w['lose']} |")
    mean = {k: sum(r[k] for r in s["per_seed"]) / len(s["per_seed"]) for k in ("sft", "themis", "plain", "oracle")}
    p = s["win_tie_lose_pooled"]
    lines.append(f"| mean | {_pct(mean['sft'])} | {_pct(mean['themis'])} | {_pct(mean['plain'])} | {_pct(mean['oracle'])} | "
                 f"{p['win']} / {p['tie']} / {p['lose']} (pooled) |")
    lines += ["", "Paired by seed, mean difference in points [95% t-interval]:",
              f"- themis - plain: {_ci(s['themis_minus_plain'])}",
              f"- themis - SFT:   {_ci(s['themis_minus_sft'])}",
              f"- plain - SFT:    {_ci(s['plain_minus_sft'])}",
              f"- oracle - themis: {_ci(s['oracle_minus_themis'])}"]
    if "oracle_minus_sft" in s:
        lines.append(f"- oracle - SFT:   {_ci(s['oracle_minus_sft'])}")
    if "expected_themis_minus_plain" in s:
        lines += [f"- secondary, exact expected accuracy at temperature 1: themis - plain {_ci(s['expected_themis_minus_plain'])}; "
                  f"oracle - SFT {_ci(s['expected_oracle_minus_sft'])}; themis - SFT {_ci(s['expected_themis_minus_sft'])}"]
    if s.get("win_tie_lose_pooled_rates"):
        rt = s["win_tie_lose_pooled_rates"]
        lines.append(f"- pooled win / tie / lose rates: {rt['win']:.3f} / {rt['tie']:.3f} / {rt['lose']:.3f} (paper: .32 / .55 / .13)")
    lines += ["", "Reward hacking: per step, mean raw RM score | true accuracy of the same samples | RM ranking accuracy "
              "(AUC over right/wrong sample pairs), averaged over seeds, first / middle / last step:"]
    for arm in ("themis", "plain", "oracle"):
        curves = [r[arm]["curve"] for r in results["runs"] if r[arm].get("curve")]
        if not curves:
            continue
        idx = sorted({0, len(curves[0]) // 2, len(curves[0]) - 1})
        parts = []
        for i in idx:
            pts = [c[i] for c in curves if i < len(c)]
            acc = sum(pt["true_accuracy"] for pt in pts) / len(pts)
            txt = f"step {pts[0]['step']}: truth {_pct(acc)}%"
            if "rm_mean" in pts[0]:
                rm = sum(pt["rm_mean"] for pt in pts) / len(pts)
                ra = [pt["rm_ranking_accuracy"] for pt in pts if pt["rm_ranking_accuracy"] is not None]
                txt += f", RM mean {rm:+.2f}, ranking {_pct(sum(ra) / len(ra) if ra else None)}%"
            parts.append(txt)
        ra = [pt["rm_ranking_accuracy"] for c in curves for pt in c if pt.get("rm_ranking_accuracy") is not None]
        blind = [pt["tool_blind"] for c in curves for pt in c if "tool_blind" in pt]
        lines.append(f"- {arm}: " + "; ".join(parts) + (f"; ranking over all steps {_pct(sum(ra) / len(ra))}%" if ra else "")
                     + (f"; samples wrong by the exact date but the tool's right date {sum(blind)}" if blind else ""))
    if results.get("ppo_smoke"):
        sm = results["ppo_smoke"]
        c = sm["curve"]
        lines += ["", f"PPO smoke (Themis reward, seed {sm['seed']}, {sm['steps']} steps, {sm['wall_s']:.0f} s wall, "
                  f"{sm['cpu_s']:.0f} s CPU): per-step truth " + ", ".join(_pct(x["true_accuracy"]) for x in c) + "%"]
    cost = "1 thread"  # runs before the job graph (session 9) record no graph
    if results.get("graph"):
        cost = f"{results['workers']} one-thread worker process(es); the job graph's CPU {results['graph']['cpu_s']:.0f} s"
        if results.get("read_back"):
            cost += f", {len(results['read_back'])} jobs read back from an earlier run included"
    lines += ["", f"Total {results['wall_s']:.0f} s wall, {results['cpu_s']:.0f} s CPU ({cost}); load average "
              f"{results['loadavg_start'][0]:.2f} at start, {results['loadavg_end'][0]:.2f} at end; {results['machine']}"]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    colours = {"themis": "tab:green", "plain": "tab:red", "oracle": "tab:blue"}
    for r in results["runs"]:
        for arm in ("themis", "plain", "oracle"):
            c = r[arm]["curve"]
            if not c:
                continue
            steps = [x["step"] for x in c]
            axes[0].plot(steps, [x["true_accuracy"] for x in c], color=colours[arm], alpha=0.6,
                         label=arm if r is results["runs"][0] else None)
            if arm != "oracle":
                axes[1].plot(steps, [x["rm_mean"] for x in c], color=colours[arm], alpha=0.6,
                             label=f"{arm} RM" if r is results["runs"][0] else None)
                axes[2].plot(steps, [x["rm_ranking_accuracy"] if x["rm_ranking_accuracy"] is not None else math.nan for x in c],
                             color=colours[arm], alpha=0.6, label=f"{arm} RM" if r is results["runs"][0] else None)
    axes[0].set_title("true accuracy of the step's samples")
    axes[1].set_title("mean raw RM score of the same samples")
    axes[2].set_title("RM ranking accuracy (AUC) on them")
    for ax in axes:
        ax.set_xlabel("GRPO step")
        ax.legend()
    axes[2].axhline(0.5, color="grey", lw=0.8, ls="--")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
