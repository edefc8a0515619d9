"""GvU end to end on the toy visual world (PAPERS.md §3), on a CPU.

1. Build and briefly pre-train a toy unified multimodal model (a 2-layer causal LM over caption words and
   image tokens; more understanding than generation data, as real UMMs), or reuse one.
2. Measure it: GenEval-style accuracy of its images (the external checker = the world's parser) and the
   accuracy of its understanding branch at picking the true caption of an image among false ones.
3. GRPO over image tokens with the model's own understanding as the only reward (LoRA, KL k3 against the
   adapter-disabled model, beta 0.03, G = 8, temperature 1.0, min_p 0.03) through `align.Trainer`,
   for several seeds; measure again; write results.json, a markdown table and before / after PNG grids.

    python examples/gvu_toy.py --out runs/gvu_toy --seeds 0 1 2 --steps 40 --images docs/experiments/gvu
    python examples/gvu_toy.py --out /tmp/gvu_smoke --quick        # a one-minute smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))  # the toy world (examples/toyworld.py) is an example, not the library

import toyworld as tw  # noqa: E402

import align  # noqa: E402
from align.rollouts.umm import CausalLMUMM  # noqa: E402

CONFIG = ROOT / "examples" / "configs" / "gvu_toy.yaml"
GRID_CAPTIONS = ["a triangle", "a circle and a square", "three circles", "a blue square",
                 "a circle below a triangle", "a red triangle and a green circle"]
SAMPLING = dict(temperature=1.0, min_p=0.03)


def write_prompts(path: Path) -> int:
    """Every caption of the world as a text-to-image prompt (`caption <boi>`), with its caption and task.

    Captions are repeated so that each task carries the same weight (as in GenEval's overall score, a mean
    over tasks); otherwise colour attribution (54 captions) would outweigh single objects (3) 18 to 1."""
    path.parent.mkdir(parents=True, exist_ok=True)
    most = max(len(tw.all_specs(task)) for task in tw.TASKS)
    n = 0
    with open(path, "w") as f:
        for task in tw.TASKS:
            specs = tw.all_specs(task)
            for spec in specs * (most // len(specs)):
                f.write(json.dumps({"prompt": spec.caption() + " <boi>", "caption": spec.caption(), "task": task}) + "\n")
                n += 1
    return n


def all_eval_specs() -> list[tw.Spec]:
    return [s for task in tw.TASKS for s in tw.all_specs(task)]


def evaluate(umm: CausalLMUMM, samples: int, seed: int, understanding_n: int) -> tuple[dict, list[list[int]]]:
    """GenEval-style generation accuracy over every caption + understanding accuracy (4-way caption choice)."""
    gen, images = tw.evaluate_generation(umm, all_eval_specs(), samples_per_prompt=samples, seed=seed, **SAMPLING)
    # Clutter check: a checker that accepts extra objects could be gamed by filling the grid.
    gen["objects_per_image"] = statistics.fmean(sum(v != 0 for v in img) for img in images)
    und = tw.evaluate_understanding(lambda ids, texts: umm.score_text(torch.tensor(ids), texts), umm.layout,
                                    n=understanding_n, seed=seed)
    return {"generation": gen, "understanding": und}, images


def reward_agreement(umm: CausalLMUMM, images: list[list[int]], samples: int) -> dict:
    """How well the GvU reward separates images the checker accepts from those it rejects (AUC)."""
    specs = [s for s in all_eval_specs() for _ in range(samples)]
    ids = torch.tensor([[umm.image_token_ids[v] for v in img] for img in images])
    lps = []
    for lo in range(0, len(specs), 256):
        lps += umm.score_text(ids[lo:lo + 256], [s.caption() for s in specs[lo:lo + 256]])
    rewards = [float(lp.double().mean().exp()) for lp in lps]
    ok = [tw.check(s, img, umm.layout["grid_size"]) for s, img in zip(specs, images)]
    pos = [r for r, o in zip(rewards, ok) if o]
    neg = [r for r, o in zip(rewards, ok) if not o]
    auc = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / max(1, len(pos) * len(neg))
    # Within a prompt (all that GRPO's group-normalised advantage sees): per task, over (right, wrong) pairs.
    within: dict[str, list[float]] = {}
    for i in range(0, len(specs), samples):
        r, o = rewards[i:i + samples], ok[i:i + samples]
        within.setdefault(specs[i].task, []).extend(
            (p > q) + 0.5 * (p == q) for p, a in zip(r, o) if a for q, b in zip(r, o) if not b)
    return {"reward_auc": auc, "reward_mean_correct": statistics.fmean(pos) if pos else float("nan"),
            "reward_mean_wrong": statistics.fmean(neg) if neg else float("nan"),
            "reward_auc_within_prompt": {t: statistics.fmean(v) for t, v in within.items() if v}}


def count_diagnostic(umm: CausalLMUMM, per_cell: int = 12, seed: int = 0) -> dict:
    """Mean GvU reward of "two <shape>s" / "three <shape>s" on scenes holding k = 1..4 objects of that shape
    (plus, half the time, one other object): does the understanding reward peak at the right count?"""
    rng = __import__("random").Random(seed)
    rows = []
    for n in (2, 3):
        for shape in tw.SHAPES:
            for k in range(1, 5):
                for _ in range(per_cell):
                    values = [0] * 9
                    cells = rng.sample(range(9), k + 1)
                    for c in cells[:k]:
                        values[c] = tw.cell_value(rng.choice(tw.COLORS), shape)
                    if rng.random() < 0.5:
                        values[cells[k]] = tw.cell_value(rng.choice(tw.COLORS), rng.choice([s for s in tw.SHAPES if s != shape]))
                    rows.append((n, k, f"{tw.NUMBERS[n]} {shape}s", values))
    ids = torch.tensor([[umm.image_token_ids[v] for v in r[3]] for r in rows])
    lps = umm.score_text(ids, [r[2] for r in rows])
    out: dict = {}
    for (n, k, _, _), lp in zip(rows, lps):
        out.setdefault(f"caption count {n}", {}).setdefault(f"{k} objects", []).append(float(lp.double().mean().exp()))
    return {cap: {k: statistics.fmean(v) for k, v in ks.items()} for cap, ks in out.items()}


def grid_png(rows: list[tuple[str, list[list[int]], list[list[int]]]], grid_size: int, path: Path, cell_px: int = 22) -> None:
    """Rows of (caption, before images, after images); a green frame = the checker accepts the image."""
    from PIL import Image, ImageDraw

    tile = grid_size * cell_px
    n = len(rows[0][1])
    label_w, gap, pad, head = 230, 24, 6, 22
    width = label_w + 2 * n * (tile + pad) + gap
    img = Image.new("RGB", (width, head + len(rows) * (tile + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.text((label_w, 4), "before GvU", fill=(0, 0, 0))
    draw.text((label_w + n * (tile + pad) + gap, 4), "after GvU (seed 0)", fill=(0, 0, 0))
    for r, (caption, before, after) in enumerate(rows):
        y = head + r * (tile + pad)
        draw.text((4, y + tile // 2 - 6), caption, fill=(0, 0, 0))
        for j, values in enumerate(before + after):
            x = label_w + j * (tile + pad) + (gap if j >= n else 0)
            ok = tw.check(caption, values, grid_size)
            img.paste(tw.render(values, grid_size, cell_px=cell_px, border=(40, 170, 40) if ok else (210, 40, 40)), (x, y))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def grid_images(umm: CausalLMUMM, n: int, seed: int) -> list[list[list[int]]]:
    prompts = [c + umm.layout["prompt_suffix"] for c in GRID_CAPTIONS]
    out = umm.generate_image_tokens(prompts, num_samples=n, seed=seed, **SAMPLING)
    images = [tw.image_values(r, umm.layout) for r in out.ids.tolist()]
    return [images[i * n:(i + 1) * n] for i in range(len(prompts))]


def summarise(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/gvu_toy")
    ap.add_argument("--base", default="", help="a pre-trained toy UMM to reuse (default: OUT/base-umm, built if missing)")
    ap.add_argument("--pretrain-steps", type=int, default=1500)
    ap.add_argument("--counting-scenes", type=float, default=0.0,
                    help="share of understanding pre-training scenes with 2-4 objects of one shape")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=40, help="GRPO steps per seed")
    ap.add_argument("--lr", type=float, default=None, help="override train.lr of the config")
    ap.add_argument("--scorer", choices=["policy", "teacher"], default="policy")
    ap.add_argument("--samples", type=int, default=8, help="images per caption for the GenEval-style score")
    ap.add_argument("--understanding-n", type=int, default=240)
    ap.add_argument("--images", default="", help="write before/after PNG grids to this folder")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny pre-training, 2 GRPO steps, one seed")
    ap.add_argument("--set", action="append", default=[], help="extra config overrides key=value")
    args = ap.parse_args(argv)
    if args.quick:
        args.pretrain_steps, args.seeds, args.steps, args.samples, args.understanding_n = 20, args.seeds[:1], 2, 2, 24
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    base = Path(args.base) if args.base else out / "base-umm"
    t0 = time.time()
    if not (base / "config.json").exists():
        print(f"pre-training the toy UMM for {args.pretrain_steps} steps -> {base}", flush=True)
        tw.make_toy_umm(base, steps=args.pretrain_steps, seed=0, hidden_size=32 if args.quick else 128,
                        log_every=max(1, args.pretrain_steps // 6), counting_scenes=args.counting_scenes)
    prompts_path = out / "prompts.jsonl"
    n_prompts = write_prompts(prompts_path)

    base_umm = CausalLMUMM.from_pretrained(base)
    grid_size = base_umm.layout["grid_size"]
    results: dict = {"base": str(base), "prompts": n_prompts, "steps": args.steps, "scorer": args.scorer,
                     "samples_per_caption": args.samples, "seeds": {}, "command": "python examples/gvu_toy.py " + " ".join(argv or sys.argv[1:])}
    before_grid = grid_images(base_umm, 4, seed=999)
    with torch.no_grad():
        results["count_diagnostic_base"] = count_diagnostic(base_umm)
    for seed in args.seeds:
        eval_seed = 10_000 + seed
        before, images = evaluate(base_umm, args.samples, eval_seed, args.understanding_n)
        before |= reward_agreement(base_umm, images, args.samples)
        cfg = yaml.safe_load(CONFIG.read_text())
        cfg["model"]["path"] = str(base)
        cfg["data"]["path"] = str(prompts_path)
        cfg["train"] |= {"seed": seed, "steps": args.steps} | ({"lr": args.lr} if args.lr is not None else {})
        cfg["logging"] |= {"run_dir": f"{out}/{{name}}", "name": f"grpo-seed{seed}"}
        cfg["reward"]["functions"][0]["kwargs"]["scorer"] = args.scorer
        trainer = align.Trainer(cfg, overrides=args.set)
        t = time.time()
        history = trainer.train().history
        policy = trainer.models.policy.eval()
        tuned = CausalLMUMM(policy, trainer.tokenizer, base_umm.layout)
        with torch.no_grad():
            after, images_after = evaluate(tuned, args.samples, eval_seed, args.understanding_n)
            after |= reward_agreement(tuned, images_after, args.samples)
        results["seeds"][seed] = {"before": before, "after": after, "train_s": time.time() - t,
                                  "reward_first": history[0]["reward/mean"], "reward_last": history[-1]["reward/mean"],
                                  "reward_curve": [h["reward/mean"] for h in history],
                                  "kl_last": history[-1].get("kl/mean")}
        print(f"seed {seed}: GenEval {before['generation']['overall']:.3f} -> {after['generation']['overall']:.3f}, "
              f"understanding {before['understanding']['overall']:.3f} -> {after['understanding']['overall']:.3f}, "
              f"reward {history[0]['reward/mean']:.3f} -> {history[-1]['reward/mean']:.3f} ({time.time() - t:.0f} s)", flush=True)
        if args.images and seed == args.seeds[0]:
            with torch.no_grad():
                after_grid = grid_images(tuned, 4, seed=999)
            grid_png([(c, b, a) for c, b, a in zip(GRID_CAPTIONS, before_grid, after_grid)], grid_size,
                     Path(args.images) / f"before_after_{args.scorer}.png")
    results["table"] = table(results)
    results["total_s"] = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(results["table"])
    return results


def table(results: dict) -> str:
    seeds = list(results["seeds"].values())
    lines = ["| metric | before | after |", "|---|---|---|"]
    for part in ("generation", "understanding"):
        for key in ["overall", *tw.TASKS] + (["objects_per_image"] if part == "generation" else []):
            b = [s["before"][part][key] for s in seeds]
            a = [s["after"][part][key] for s in seeds]
            lines.append(f"| {part} {key} | {summarise(b)} | {summarise(a)} |")
    for key in ("reward_auc", "reward_mean_correct", "reward_mean_wrong"):
        lines.append(f"| {key} | {summarise([s['before'][key] for s in seeds])} | {summarise([s['after'][key] for s in seeds])} |")
    lines.append(f"| training reward (first / last step) | {summarise([s['reward_first'] for s in seeds])} | "
                 f"{summarise([s['reward_last'] for s in seeds])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
