"""GvU end to end on the toy visual world (PAPERS.md §3), on a CPU.

1. Build and briefly pre-train a toy unified multimodal model (a 2-layer causal LM over caption words and
   image tokens; more understanding than generation data, as real UMMs), or reuse one.
2. Measure it: GenEval-style accuracy of its images (the external checker = the world's parser) and the
   accuracy of its understanding branch at picking the true caption of an image among false ones.
3. GRPO over image tokens with the model's own understanding as the only reward (LoRA, KL k3 against the
   adapter-disabled model, beta 0.03, G = 8, temperature 1.0, min_p 0.03) through `align.Trainer`,
   for several seeds; measure again; write results.json, a markdown table and before / after PNG grids.

    python examples/gvu_toy.py --out runs/gvu/policy-kl0.03 --base runs/gvu/base-opt --seeds 0 1 2 3 4
    python examples/gvu_toy.py --out /tmp/gvu_smoke --quick --ignore-gate   # a one-minute smoke run

Before GRPO the base model must pass the pre-RL gate (examples/gvu_gate.py): the reward discriminates within a
prompt; otherwise the script stops after printing the gate table. The base is pre-trained with captions that
state counts and clutter plus unlikelihood on near-miss captions (examples/gvu_captions.py); `--recipe plain`
is the first page's recipe.
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

import gvu_captions as gc  # noqa: E402
import gvu_gate as gate_lib  # noqa: E402
import gvu_stats  # noqa: E402
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
    """How well the GvU reward separates images the checker accepts from those it rejects (AUC), across all
    prompts and within a prompt (all that GRPO's group-normalised advantage sees; per task)."""
    specs = [s for s in all_eval_specs() for _ in range(samples)]
    rewards = reward_scorer(umm)(images, [s.caption() for s in specs])
    ok = [tw.check(s, img, umm.layout["grid_size"]) for s, img in zip(specs, images)]
    pos = [r for r, o in zip(rewards, ok) if o]
    neg = [r for r, o in zip(rewards, ok) if not o]
    within = gate_lib.within_prompt_auc(specs, images, rewards, samples, umm.layout["grid_size"])
    return {"reward_auc": gate_lib.auc([(p, q) for p in pos for q in neg]) if pos and neg else float("nan"),
            "reward_mean_correct": statistics.fmean(pos) if pos else float("nan"),
            "reward_mean_wrong": statistics.fmean(neg) if neg else float("nan"),
            "reward_auc_within_prompt": {t: v["auc"] for t, v in within.items() if v["auc"] is not None}}


def reward_scorer(umm: CausalLMUMM):
    """(image cell values, captions) -> GvU rewards exp(mean log p), in batches of 256 (the gate's Scorer)."""
    def score(images: list[list[int]], texts: list[str]) -> list[float]:
        ids = torch.tensor([[umm.image_token_ids[v] for v in img] for img in images])
        out: list[float] = []
        with torch.no_grad():
            for lo in range(0, len(texts), 256):
                out += [float(lp.double().mean().exp()) for lp in umm.score_text(ids[lo:lo + 256], texts[lo:lo + 256])]
        return out
    return score


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


def build_base(args, base: Path) -> None:
    print(f"pre-training the toy UMM ({args.recipe}) for {args.pretrain_steps} steps -> {base}", flush=True)
    common = dict(steps=args.pretrain_steps, seed=0, hidden_size=32 if args.quick else 128, log_every=max(1, args.pretrain_steps // 6))
    if args.recipe == "discriminative":
        gc.make_discriminative_umm(base, arch=args.arch, position_share=args.position_share, **common)
    else:
        tw.make_toy_umm(base, counting_scenes=args.counting_scenes, **common)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/gvu/policy-kl0.03")
    ap.add_argument("--base", default="", help="a pre-trained toy UMM to reuse (default: OUT/base-umm, built if missing)")
    ap.add_argument("--recipe", choices=["discriminative", "plain"], default="discriminative",
                    help="base pre-training: captions that state counts and clutter + unlikelihood (examples/gvu_captions.py), "
                         "or the first page's plain recipe")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="default 3000 (discriminative), 1500 (plain)")
    ap.add_argument("--arch", choices=["opt", "llama"], default="opt",
                    help="discriminative recipe: OPT (learned positions) or Llama (rotary; never learned positions here)")
    ap.add_argument("--position-share", type=float, default=0.3,
                    help="discriminative recipe: share of true-caption rows that state a relation where one holds")
    ap.add_argument("--counting-scenes", type=float, default=0.0,
                    help="plain recipe: share of understanding pre-training scenes with 2-4 objects of one shape")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=40, help="GRPO steps per seed")
    ap.add_argument("--lr", type=float, default=None, help="override train.lr of the config")
    ap.add_argument("--kl", type=float, default=None, help="override algo.kl_coef (beta) of the config (0.03)")
    ap.add_argument("--scorer", choices=["policy", "teacher"], default="policy")
    ap.add_argument("--samples", type=int, default=8, help="images per caption for the GenEval-style score")
    ap.add_argument("--understanding-n", type=int, default=240)
    ap.add_argument("--images", default="", help="write before/after PNG grids to this folder")
    ap.add_argument("--gate-only", action="store_true", help="stop after the pre-RL gate")
    ap.add_argument("--ignore-gate", action="store_true", help="run GRPO even when the gate fails")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny pre-training, 2 GRPO steps, one seed")
    ap.add_argument("--set", action="append", default=[], help="extra config overrides key=value")
    args = ap.parse_args(argv)
    if args.pretrain_steps is None:
        args.pretrain_steps = 3000 if args.recipe == "discriminative" else 1500
    if args.quick:
        args.pretrain_steps, args.seeds, args.steps, args.samples, args.understanding_n = 20, args.seeds[:1], 2, 2, 24
    torch.set_num_threads(1)  # the machine is shared: one thread per process
    out = Path(args.out)
    base = Path(args.base) if args.base else out / "base-umm"
    t0 = time.time()
    if not (base / "config.json").exists():
        build_base(args, base)
    prompts_path = out / "prompts.jsonl"
    n_prompts = write_prompts(prompts_path)

    base_umm = CausalLMUMM.from_pretrained(base)
    grid_size = base_umm.layout["grid_size"]
    cfg0 = yaml.safe_load(CONFIG.read_text())
    beta = args.kl if args.kl is not None else cfg0["algo"]["kl_coef"]
    results: dict = {"base": str(base), "recipe": json.loads((base / "pretrain.json").read_text()) if (base / "pretrain.json").exists() else {},
                     "prompts": n_prompts, "steps": args.steps, "scorer": args.scorer, "kl_coef": beta,
                     "samples_per_caption": args.samples, "seeds": {}, "command": "python examples/gvu_toy.py " + " ".join(argv or sys.argv[1:])}
    # The pre-RL gate, on the base's own samples (those of seed 0's "before" evaluation) and perturbations of them.
    specs = [s for s in all_eval_specs() for _ in range(args.samples)]
    _, gate_images = tw.evaluate_generation(base_umm, all_eval_specs(), samples_per_prompt=args.samples, seed=10_000, **SAMPLING)
    results["gate"] = gate_lib.gate(reward_scorer(base_umm), specs, gate_images, args.samples, grid_size)
    print(gate_lib.gate_table(results["gate"]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    if args.gate_only or not (results["gate"]["passed"] or args.ignore_gate):
        if not results["gate"]["passed"]:
            print("gate failed: " + "; ".join(results["gate"]["failures"]) + (" (no GRPO; --ignore-gate runs it)" if not args.gate_only else ""))
        results["total_s"] = time.time() - t0
        (out / "results.json").write_text(json.dumps(results, indent=1))
        return results
    before_grid = grid_images(base_umm, 4, seed=999)
    for seed in args.seeds:
        eval_seed = 10_000 + seed
        before, images = evaluate(base_umm, args.samples, eval_seed, args.understanding_n)
        before |= reward_agreement(base_umm, images, args.samples)
        cfg = yaml.safe_load(CONFIG.read_text())
        cfg["model"]["path"] = str(base)
        cfg["data"]["path"] = str(prompts_path)
        cfg["algo"]["kl_coef"] = beta
        cfg["train"] |= {"seed": seed, "steps": args.steps} | ({"lr": args.lr} if args.lr is not None else {})
        cfg["logging"] |= {"run_dir": f"{out}/{{name}}", "name": f"grpo-seed{seed}"}
        cfg["checkpoint"] = {**cfg.get("checkpoint", {}), "overwrite": True}  # a rerun recomputes each seed
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
                                  "kl_curve": [h.get("loss/kl") for h in history],
                                  "kl_last": history[-1].get("loss/kl")}
        print(f"seed {seed}: GenEval {before['generation']['overall']:.3f} -> {after['generation']['overall']:.3f}, "
              f"understanding {before['understanding']['overall']:.3f} -> {after['understanding']['overall']:.3f}, "
              f"reward {history[0]['reward/mean']:.3f} -> {history[-1]['reward/mean']:.3f} ({time.time() - t:.0f} s)", flush=True)
        if args.images and seed == args.seeds[0]:
            with torch.no_grad():
                after_grid = grid_images(tuned, 4, seed=999)
            grid_png([(c, b, a) for c, b, a in zip(GRID_CAPTIONS, before_grid, after_grid)], grid_size,
                     Path(args.images) / f"before_after_{args.scorer}_kl{beta:g}.png")
    results["table"] = table(results)
    results["total_s"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(results["table"])
    return results


def table(results: dict) -> str:
    """Before / after per skill with the paired (by seed) difference and its 95% t-interval (examples/gvu_stats.py)."""
    return gvu_stats.tables([results])


if __name__ == "__main__":
    main()
