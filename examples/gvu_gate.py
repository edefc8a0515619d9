"""The pre-RL gate of the GvU experiment: is the understanding reward discriminative *within a prompt*?

GRPO only sees reward differences between images drawn for the same caption, so the gate measures exactly
that, before any RL (docs/experiments/gvu.md):

1. within-prompt AUC per skill on the base model's own samples: over (accepted, rejected) pairs of the
   images sampled for one caption, the share where the accepted one gets the higher reward (ties 1/2);
2. AUC per perturbation kind on near-miss images: an accepted image against its own perturbation, which the
   checker rejects (counting k-1 / k+1 / k+3, swapped positions, changed colour, clutter; see
   `gvu_captions.perturbations`); the accepted images are the base's own where it has any, else scenes drawn
   for the caption;
3. the reward of "two <shape>s" / "three <shape>s" peaks at the true count over k = 1..6.

`gate(...)` returns every figure and `passed`: all AUCs >= `threshold` (0.8), for every skill with at least
`min_pairs` pairs, and both count curves peak at the true count.
"""
from __future__ import annotations

import random
import statistics
from typing import Callable, Sequence

import gvu_captions as gc
import toyworld as tw

Scorer = Callable[[list[list[int]], list[str]], list[float]]  # (image cell values, captions) -> rewards


def auc(pairs: Sequence[tuple[float, float]]) -> float:
    """Share of (good, bad) pairs where good > bad, ties counted 1/2."""
    return sum((g > b) + 0.5 * (g == b) for g, b in pairs) / len(pairs)


def within_prompt_auc(specs: Sequence[tw.Spec], images: Sequence[Sequence[int]], rewards: Sequence[float],
                      samples: int, grid_size: int) -> dict[str, dict]:
    """Per task: AUC over (accepted, rejected) pairs inside each caption's group of `samples` images."""
    pairs: dict[str, list[tuple[float, float]]] = {}
    for i in range(0, len(specs), samples):
        ok = [tw.check(specs[i], img, grid_size) for img in images[i:i + samples]]
        r = rewards[i:i + samples]
        pairs.setdefault(specs[i].task, []).extend((p, q) for p, a in zip(r, ok) if a for q, b in zip(r, ok) if not b)
    return {task: {"auc": auc(v) if v else None, "pairs": len(v)} for task, v in pairs.items()}


def perturbation_auc(score: Scorer, specs: Sequence[tw.Spec], images: Sequence[Sequence[int]], samples: int,
                     grid_size: int, seed: int = 0, per_caption: int = 2) -> dict[str, dict]:
    """Per (task, perturbation kind): AUC of the reward of an accepted image against its near-miss version."""
    rng = random.Random(seed)
    rows: list[tuple[str, list[int], list[int], str]] = []
    for i in range(0, len(specs), samples):
        spec = specs[i]
        accepted = [list(img) for img in images[i:i + samples] if tw.check(spec, img, grid_size)][:per_caption]
        while len(accepted) < per_caption:
            accepted.append(tw.scene_for(spec, rng, grid_size))
        for img in accepted:
            for kind, pert in gc.perturbations(spec, img, rng, grid_size).items():
                rows.append((f"{spec.task}/{kind}", img, pert, spec.caption()))
    r = score([x[1] for x in rows] + [x[2] for x in rows], [x[3] for x in rows] * 2)
    n = len(rows)
    pairs: dict[str, list[tuple[float, float]]] = {}
    for k, (key, _, _, _) in enumerate(rows):
        pairs.setdefault(key, []).append((r[k], r[n + k]))
    return {key: {"auc": auc(v), "pairs": len(v)} for key, v in sorted(pairs.items())}


def count_curve(score: Scorer, grid_size: int, per_cell: int = 12, seed: int = 0, max_k: int = 6) -> dict[str, dict]:
    """Mean reward of "<n> <shape>s" (n = 2, 3) on scenes with k = 1..max_k objects of the shape (half the time
    plus one other object), and the k where it peaks."""
    rng = random.Random(seed)
    rows = []
    for n in tw.NUMBERS:
        for shape in tw.SHAPES:
            for k in range(1, max_k + 1):
                for _ in range(per_cell):
                    values = gc.add_objects([0] * grid_size ** 2, rng, k, shape)
                    if rng.random() < 0.5 and k < grid_size ** 2:
                        values = gc.add_objects(values, rng, 1, rng.choice([s for s in tw.SHAPES if s != shape]))
                    rows.append((n, k, f"{tw.NUMBERS[n]} {shape}s", values))
    r = score([x[3] for x in rows], [x[2] for x in rows])
    out: dict[str, dict] = {}
    for n in tw.NUMBERS:
        means = {k: statistics.fmean(v for (m, kk, _, _), v in zip(rows, r) if m == n and kk == k) for k in range(1, max_k + 1)}
        out[tw.NUMBERS[n]] = {"mean_reward": means, "peak": max(means, key=means.get), "true": n}
    return out


def gate(score: Scorer, specs: Sequence[tw.Spec], images: Sequence[Sequence[int]], samples: int, grid_size: int,
         threshold: float = 0.8, min_pairs: int = 10, seed: int = 0) -> dict:
    """All three checks on one model. `specs`/`images`: the base's own samples, `samples` per caption, prompt-major."""
    rewards = score([list(x) for x in images], [s.caption() for s in specs])
    within = within_prompt_auc(specs, images, rewards, samples, grid_size)
    perturbed = perturbation_auc(score, specs, images, samples, grid_size, seed=seed)
    counts = count_curve(score, grid_size, seed=seed)
    failures = [f"within-prompt {t}: AUC {v['auc']:.3f}" for t, v in within.items()
                if v["pairs"] >= min_pairs and v["auc"] < threshold]
    failures += [f"perturbed {k}: AUC {v['auc']:.3f}" for k, v in perturbed.items() if v["pairs"] >= min_pairs and v["auc"] < threshold]
    failures += [f"'{w} <shape>s' peaks at k = {v['peak']}" for w, v in counts.items() if v["peak"] != v["true"]]
    return {"within_prompt": within, "perturbed": perturbed, "count_curve": counts, "threshold": threshold,
            "min_pairs": min_pairs, "failures": failures, "passed": not failures}


def gate_table(g: dict) -> str:
    lines = ["| check | AUC | pairs |", "|---|---|---|"]
    for t, v in g["within_prompt"].items():
        shown = "n/a" if v["auc"] is None else f"{v['auc']:.3f}"
        lines.append(f"| within prompt, {t} | {shown} | {v['pairs']} |")
    for k, v in g["perturbed"].items():
        lines.append(f"| perturbed, {k} | {v['auc']:.3f} | {v['pairs']} |")
    for w, v in g["count_curve"].items():
        curve = " / ".join(f"{x:.3f}" for x in v["mean_reward"].values())
        lines.append(f"| '{w} <shape>s', reward for k = 1..{len(v['mean_reward'])} | {curve} (peak k = {v['peak']}) | |")
    lines.append(f"| **gate (AUC >= {g['threshold']}, peak at the true count)** | **{'passed' if g['passed'] else 'FAILED'}** | |")
    return "\n".join(lines)
