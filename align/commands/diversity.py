"""`align eval-diversity`: sample N completions per prompt from a checkpoint and report the CD-RLHF
diversity metrics (align/diversity.py)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from align.diversity import DEFAULT_EAD_VOCAB_SIZE
from align.errors import UserError

METRIC_NOTES = {
    "diversity": "higher = more diverse",
    "ead": "higher = more diverse",
    "self_bleu": "lower = more diverse",
    "sentbert": "lower = more diverse",
    "distinct_1": "higher = more diverse",
    "distinct_2": "higher = more diverse",
}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval-diversity",
        help="sample N completions per prompt from a checkpoint and print diversity metrics",
        description="Sample N completions per prompt from a model or training checkpoint and print them with "
                    "the CD-RLHF diversity metrics (Diversity, EAD, SelfBLEU-4, SentBERT, distinct-n).",
    )
    # flags default to None: the defaults live in align.command_configs.DiversityEvalConfig (one place)
    p.add_argument("checkpoint", nargs="?", help="a Hugging Face model directory, a checkpoint (RUN/checkpoints/step-N) "
                                                 "or a run directory")
    p.add_argument("--config", help="YAML/JSON with the keys below (checkpoint, prompts, n, temperature, ...); "
                                    "flags given on the command line win")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set n=4 (repeatable)")
    p.add_argument("--prompts", help="JSONL file, one object per line with the prompt under --prompt-key")
    p.add_argument("--prompt-key", help="field holding the prompt: a string or a list of chat messages (default prompt)")
    p.add_argument("--n", type=int, help="samples per prompt (>= 2; default 10)")
    p.add_argument("--temperature", type=float, help="default 1.0")
    p.add_argument("--top-p", type=float, help="default 1.0")
    p.add_argument("--max-new-tokens", type=int, help="default 64")
    p.add_argument("--limit", type=int, help="use only the first LIMIT prompts")
    p.add_argument("--batch-size", type=int, help="sequences decoded together (default 64)")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--device", help="default cpu")
    p.add_argument("--no-sentbert", dest="sentbert", action="store_false", default=None,
                   help="skip the SentBERT metric (no encoder is loaded)")
    p.add_argument("--ead-vocab-size", type=int, help=f"V in EAD (default: {DEFAULT_EAD_VOCAB_SIZE}, as the CD-RLHF evaluation)")
    p.add_argument("--output", help="write samples and metrics to this JSON file")
    p.add_argument("--quiet", action="store_true", help="print only the metrics, not the samples")
    p.set_defaults(func=run)


def read_prompts(path: str | Path, key: str, limit: int | None = None) -> list[Any]:
    """Prompts from a JSONL file; a one-line UserError names the line and the fix when one is malformed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--prompts {path}: no such file; give a JSONL file with a {key!r} field per line")
    prompts: list[Any] = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg}); write one JSON object per line") from None
        if not isinstance(record, dict) or key not in record:
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise UserError(f"{path}:{lineno}: no {key!r} field (found {found}); set --prompt-key to the prompt's field")
        value = record[key]
        if not isinstance(value, (str, list)):
            raise UserError(f"{path}:{lineno}: {key!r} must be a string or a list of chat messages")
        prompts.append(value)
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise UserError(f"--prompts {path}: no prompts found")
    return prompts


def resolve_model_dir(path: str | Path) -> Path:
    """The folder holding the weights: the path itself (a model or a checkpoint), the `policy/` of an
    earlier version's checkpoint, or the model of a run's latest checkpoint."""
    from align.checkpoint import model_dir

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint or model directory")

    def is_model(p: Path) -> bool:
        full = (p / "config.json").is_file() and any(p.glob("*.safetensors"))
        return full or (p / "adapter_config.json").is_file()

    latest = path / "checkpoints" / "latest"
    candidates = [path, model_dir(path)]
    if latest.is_file():
        candidates.append(model_dir(path / "checkpoints" / latest.read_text().strip()))
    for candidate in candidates:
        if is_model(candidate):
            return candidate
    raise UserError(f"{path}: not a model directory (config.json + weights), a checkpoint, "
                    "or a run directory with checkpoints/latest")


def load_model(model_dir: Path, device: str):
    """(model, tokenizer) from a full model or a LoRA adapter folder (adapters merged for sampling)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (model_dir / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(model_dir)).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def _prompt_text(prompt: Any, tokenizer) -> str:
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("a prompt is a list of chat messages but the tokenizer has no chat template; give plain strings")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def sample_completions(model, tokenizer, prompts: list[Any], n: int, temperature: float, top_p: float,
                       max_new_tokens: int, batch_size: int = 64, seed: int = 0) -> list[list[str]]:
    """N sampled completions per prompt with the project's rollout engine (the sampler training uses),
    decoded without special tokens. Sample k of prompt i has sample id i * n + k, so a seed fixes the text."""
    import torch

    from align.rollouts import RolloutEngine, SamplingParams

    texts = [_prompt_text(p, tokenizer) for p in prompts]
    engine = RolloutEngine(model, tokenizer, micro_batch_size=batch_size)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    generator = torch.Generator(device=engine.device).manual_seed(seed)
    repeated = [t for t in texts for _ in range(n)]  # prompt-major, as the trainer's batches
    batch = engine.generate(repeated, params, sample_ids=torch.arange(len(repeated)), generator=generator)
    return [batch.completions[i * n:(i + 1) * n] for i in range(len(texts))]


def format_metrics(metrics: dict[str, float]) -> str:
    width = max(len(k) for k in metrics)
    lines = [f"{'metric'.ljust(width)}  {'value':>8}  note", f"{'-' * width}  {'-' * 8}  {'-' * 20}"]
    lines += [f"{k.ljust(width)}  {v:8.4f}  {METRIC_NOTES.get(k, '')}" for k, v in metrics.items()]
    return "\n".join(lines)


CONFIG_FLAGS = ("checkpoint", "prompts", "prompt_key", "n", "temperature", "top_p", "max_new_tokens", "limit",
                "batch_size", "seed", "device", "sentbert", "ead_vocab_size", "output")


def run(args: argparse.Namespace) -> int:
    from align.command_configs import load_diversity_config
    from align.diversity import diversity

    cfg = load_diversity_config(args.config, {k: getattr(args, k) for k in CONFIG_FLAGS}, args.overrides)
    prompts = read_prompts(cfg.prompts, cfg.prompt_key, cfg.limit)
    model_dir = resolve_model_dir(cfg.checkpoint)
    model, tokenizer = load_model(model_dir, cfg.device)
    t0 = time.perf_counter()
    samples = sample_completions(model, tokenizer, prompts, cfg.n, cfg.temperature, cfg.top_p,
                                 cfg.max_new_tokens, cfg.batch_size, cfg.seed)
    gen_s = time.perf_counter() - t0
    if not args.quiet:
        for prompt, group in zip(prompts, samples):
            print(f"=== prompt: {prompt if isinstance(prompt, str) else json.dumps(prompt)}")
            for j, text in enumerate(group):
                print(f"  [{j}] {text}")
    metrics = diversity(samples, sentbert=cfg.sentbert, ead_vocab_size=cfg.ead_vocab_size)
    print(f"\n{model_dir}: {len(prompts)} prompts x {cfg.n} samples, temperature {cfg.temperature}, "
          f"top_p {cfg.top_p}, max_new_tokens {cfg.max_new_tokens} ({gen_s:.1f} s sampling)")
    print(format_metrics(metrics))
    if cfg.output:
        record = {"checkpoint": str(model_dir), "n": cfg.n, "temperature": cfg.temperature, "top_p": cfg.top_p,
                  "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, "metrics": metrics,
                  "samples": [{"prompt": p, "completions": g} for p, g in zip(prompts, samples)]}
        Path(cfg.output).write_text(json.dumps(record, indent=2))
        print(f"wrote {cfg.output}", file=sys.stderr)
    return 0
