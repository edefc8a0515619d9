"""`align train`, `align sft`, `align plot`."""
from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run PPO or GRPO from a YAML/JSON config")
    p.add_argument("config", help="path to a .yaml/.json config (top-level key `algorithm: ppo|grpo`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-5 (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run saved in RUN_DIR (or a checkpoint dir)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run directory that holds a run (checkpoint.overwrite: true)")
    p.set_defaults(func=run_train)

    s = sub.add_parser("sft", help="supervised fine-tuning on prompt/completion pairs")
    s.add_argument("config")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    s.set_defaults(func=run_sft)

    pl = sub.add_parser("plot", help="plot reward / KL / loss curves of a run to PNG")
    pl.add_argument("run_dir")
    pl.add_argument("--out", help="output PNG (default RUN_DIR/curves.png)")
    pl.set_defaults(func=run_plot)


def run_train(args) -> int:
    from align.config import load_config
    from align.trainer.loop import train

    config = load_config(args.config, args.overrides + (["checkpoint.overwrite=true"] if args.overwrite else []))
    result = train(config, resume_from=args.resume)
    summary = {k: round(v, 5) for k, v in result.metrics.items() if k.startswith(("reward/", "kl/", "loss/"))}
    print(json.dumps({"run_dir": str(result.run_dir), "checkpoint": str(result.checkpoint), **summary}, indent=2))
    return 0


def run_sft(args) -> int:
    from align.supervised import sft

    print(json.dumps(sft(args.config, args.overrides), indent=2))
    return 0


def run_plot(args) -> int:
    from align.metrics import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0
