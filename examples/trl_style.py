"""A TRL-style GRPO script run by align: the parts a TRL user already has stay as they are.

What a TRL `GRPOTrainer` script holds, and what align takes unchanged:
- a `datasets.Dataset` with conversational prompts (`prompt` = a list of chat messages) and extra columns;
- reward functions written for TRL: `fn(prompts, completions, **kwargs)`, reading `c[0]["content"]` of each
  conversational completion, dataset columns by name and `trainer_state` (TRL's keyword);
- LoRA (TRL: `peft_config=LoraConfig(...)`; here `model.lora`).
Only the trainer call differs: `align.train(config, dataset=dataset)` instead of
`GRPOTrainer(model, reward_funcs, args, train_dataset, peft_config).train()`. docs/migrating.md maps the keys.

    python examples/trl_style.py --model Qwen/Qwen2.5-0.5B-Instruct --out runs/trl_style --steps 200
    python examples/trl_style.py --tiny --out runs/trl_style_tiny --steps 2     # a tiny random model, CPU, seconds
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from datasets import Dataset

import align


def build_dataset(n: int = 64, seed: int = 0) -> Dataset:
    """Addition questions as a chat, TRL's conversational format, with the answer as a column."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"prompt": [{"role": "system", "content": "Answer with the number only."},
                                {"role": "user", "content": f"{a}+{b}="}],
                     "answer": str(a + b)})
    return Dataset.from_list(rows)


# ------------------------------------------------------------------ reward functions, as written for TRL


def correctness_reward(completions, answer, **kwargs):
    """1.0 when the reply starts with the right number."""
    return [1.0 if c[0]["content"].strip().split(" ")[0] == a else 0.0 for c, a in zip(completions, answer)]


def brevity_reward(completions, trainer_state, **kwargs):
    """A length penalty annealed in over the run, read from TRL's trainer_state."""
    weight = min(1.0, trainer_state.global_step / max(1, trainer_state.max_steps))
    return [-0.01 * weight * len(c[0]["content"]) for c in completions]


def make_config(model: str, out: str | Path, steps: int, group_size: int = 8, prompts_per_step: int = 8,
                max_new_tokens: int = 16) -> dict:
    return {
        "algorithm": "grpo",
        "model": {"path": str(model), "lora": {"enabled": True, "r": 8, "alpha": 16}},
        "reward": {"functions": [correctness_reward, brevity_reward]},
        "algo": {"group_size": group_size},  # TRL: num_generations
        "rollout": {"max_new_tokens": max_new_tokens, "temperature": 1.0},  # TRL: max_completion_length
        "train": {"steps": steps, "prompts_per_step": prompts_per_step, "lr": 1e-4},  # TRL: learning_rate
        "logging": {"run_dir": str(out), "progress": False},
    }


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a Hugging Face chat model name or directory")
    ap.add_argument("--tiny", action="store_true", help="build a tiny random model under OUT/tiny-model instead")
    ap.add_argument("--out", default="runs/trl_style")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out (TRL: overwrite_output_dir)")
    args = ap.parse_args(argv)
    if bool(args.model) == args.tiny:
        ap.error("give exactly one of --model PATH and --tiny")
    if args.tiny:
        from align.testing import make_tiny_model

        model = make_tiny_model(Path(args.out) / "tiny-model", seed=0)
        cfg = make_config(model, args.out, args.steps, group_size=2, prompts_per_step=2, max_new_tokens=4)
        cfg["checkpoint"] = {"overwrite": args.overwrite}
    else:
        cfg = make_config(args.model, args.out, args.steps)
        cfg["checkpoint"] = {"overwrite": args.overwrite}
    result = align.train(cfg, dataset=build_dataset())
    last = result.history[-1]
    print(f"{len(result.history)} steps; last step reward/mean {last['reward/mean']:.3f}")
    return result


if __name__ == "__main__":
    main()
