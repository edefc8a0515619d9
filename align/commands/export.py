"""`align export RUN --out DIR [--push-to-hub REPO]`: a run's checkpoint as a plain Hugging Face model.

LoRA adapters are merged into the base weights (peft's `merge_and_unload`), so the result loads with
`AutoModelForCausalLM.from_pretrained(DIR)` without peft and serves in vLLM / TGI like any model; the trainer
state (trainer.pt, align_config.json) is left behind. `--push-to-hub` uploads DIR with huggingface_hub (its
token from `hf auth login` or $HF_TOKEN, never from the run's config)."""
from __future__ import annotations

import argparse
from pathlib import Path

from align.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="save a run's checkpoint as a Hugging Face model (LoRA merged), optionally push it")
    p.add_argument("run", help="a run directory (its latest checkpoint) or a checkpoint directory (step-NNNNNN)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created; must be empty if it exists)")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload DIR to this hub repository (namespace/name)")
    p.add_argument("--private", action="store_true", help="create the hub repository as private")
    p.set_defaults(func=run_export)


def export_checkpoint(run: str | Path, out: str | Path, push_to_hub: str | None = None, private: bool = False) -> Path:
    """Save the policy of `run` (a run directory or a checkpoint) to `out` as a Hugging Face model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.checkpoint import find_checkpoint, model_dir

    try:
        source = model_dir(find_checkpoint(run))  # `latest` confined to its run, as on resume
    except UserError as err:
        raise UserError(str(err).replace("cannot resume", "cannot export", 1)) from None
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty; give a new or empty directory")
    if (source / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(source)).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(source))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(out)
    if push_to_hub:
        import huggingface_hub  # looked up at call time: tests replace its upload functions

        huggingface_hub.create_repo(push_to_hub, private=private, exist_ok=True)
        huggingface_hub.upload_folder(repo_id=push_to_hub, folder_path=str(out),
                                      commit_message=f"align export of {Path(run).name}")
    return out


def run_export(args) -> int:
    out = export_checkpoint(args.run, args.out, args.push_to_hub, args.private)
    print(f"exported to {out}" + (f" and pushed to {args.push_to_hub}" if args.push_to_hub else ""))
    return 0
