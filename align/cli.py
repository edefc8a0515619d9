"""The `align` command. Each sub-command lives in `align/commands/<name>.py` and exposes
`register(subparsers)`, which adds an argparse parser whose default `func(args) -> int` runs it."""
from __future__ import annotations

import argparse
import importlib
import sys

from align.errors import DistributedError, UserError

COMMAND_MODULES = (
    "align.commands.train",      # train, sft, plot
    "align.commands.export",     # export
    "align.commands.rewards",    # train-rm, eval-rm, serve-rewards
    "align.commands.diversity",  # eval-diversity
    "align.commands.submit",     # submit (Ray Jobs)
    "align.commands.bench",      # bench
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align", description="RLHF with PPO / GRPO, tool-augmented and curiosity rewards.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # the command module is not part of this build
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as err:  # the one hierarchy (align.errors): unknown names, missing files, bad data included
        print(f"align {args.command}: error: {err}", file=sys.stderr)
        return 2
    except DistributedError as err:  # a rank died or stalled: this rank's line says so; the run ends, never hangs
        print(f"align {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
