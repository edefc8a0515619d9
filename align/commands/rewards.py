"""Reward commands: `align serve-rewards` (HTTP scoring service); `train-rm` / `eval-rm` register here too.

Each command has its own `register_<name>(subparsers)` and handler; `register` calls them all.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from align.errors import UserError

# ------------------------------------------------------------------------------------------------ serve-rewards

def _serve_rewards(args: argparse.Namespace) -> int:
    from align.command_configs import ServeSettings, load_serve_config
    from align.config import RewardConfig, build
    from align.rewards.registry import get_reward
    from align.rewards.service import check_bind, serve

    cfg = load_serve_config(args.config, args.overrides)
    flags = {k: getattr(args, k) for k in cfg.serve.to_dict() if getattr(args, k, None) is not None}
    # the flags pass the same checks as the config's serve: section
    settings = build(ServeSettings, {**cfg.serve.given(), **flags}, "serve").given()
    if args.token_file:
        try:
            settings["token"] = Path(args.token_file).read_text().strip()
        except OSError as err:
            raise UserError(f"cannot read --token-file {args.token_file}: {err.strerror}") from None
    no_auth = bool(settings.pop("no_auth", False))
    if no_auth and settings.get("token"):
        raise UserError("--no-auth and a token (--token / --token-file / serve.token) were both given; drop one")
    # --no-auth is asked for by name: a token in the environment does not silently switch auth back on
    settings.setdefault("token", None if no_auth else os.environ.get("ALIGN_REWARD_TOKEN") or None)
    settings.setdefault("host", "127.0.0.1")
    settings.setdefault("port", 8000)
    try:
        kwargs = json.loads(args.reward_kwargs) if args.reward_kwargs else {}
    except json.JSONDecodeError as err:
        raise UserError(f"--reward-kwargs is not valid JSON ({err.msg}); e.g. --reward-kwargs '{{\"timeout_s\": 2}}'") from None
    if not isinstance(kwargs, dict):
        raise UserError("--reward-kwargs must be a JSON object, e.g. '{\"timeout_s\": 2}'")
    spec = args.reward or cfg.reward
    if spec is None:
        raise UserError("no reward to serve; pass --reward NAME (e.g. math_verify) or a CONFIG with a 'reward' key")
    try:
        check_bind(settings["host"], settings.get("token"), no_auth)
    except ValueError as err:
        raise UserError(str(err)) from None

    def build():  # also the replacement when a reward call is stuck (a fresh object, never the stuck one)
        if isinstance(spec, RewardConfig):  # a training config's reward: {functions: [...]} section
            from align.reward_setup import build_reward

            return get_reward(build_reward(spec), **kwargs)
        return get_reward(spec, **kwargs)

    try:
        reward = build()
    except (TypeError, ValueError) as err:
        raise UserError(f"cannot build reward {spec!r}: {err}") from None
    host, port, token = settings.pop("host"), int(settings.pop("port")), settings.pop("token")
    try:
        serve(reward, host=host, port=port, token=token, no_auth=no_auth, log_level=args.log_level,
              reward_factory=build, **settings)
    except ValueError as err:
        raise UserError(str(err)) from None
    return 0


def register_serve_rewards(subparsers) -> None:
    p = subparsers.add_parser(
        "serve-rewards", help="serve a reward function over HTTP (POST /score, /get_reward)",
        description="Serve a reward over HTTP: POST /score, POST /get_reward (OpenRLHF), GET /health, GET /metrics. "
                    "Binds 127.0.0.1 by default; any other host needs a bearer token (or --no-auth).")
    p.add_argument("config", nargs="?", help="YAML/JSON with 'reward: NAME | {name, kwargs}' (or a training config's "
                                             "'reward: {functions: [...]}') and an optional 'serve:' section")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set serve.port=9000 (repeatable)")
    p.add_argument("--reward", help="registered reward name (math_verify, code_tests, format, themis, classifier_rm) "
                                    "or module:attr")
    p.add_argument("--reward-kwargs", help="JSON object of arguments for the reward, e.g. '{\"timeout_s\": 2}'")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--token", help="bearer token clients must send (default: $ALIGN_REWARD_TOKEN); required off loopback")
    p.add_argument("--token-file", help="read the bearer token from this file (keeps it out of the process list)")
    p.add_argument("--no-auth", action="store_true", default=None,
                   help="serve a non-loopback --host without a token, for clients that send no auth header "
                        "(OpenRLHF); trusted networks only, warns at start-up")
    p.add_argument("--on-error", metavar="fail|value:X",
                   help="/get_reward: an errored sample fails the batch with 500 (fail, the default) or gets X "
                        "(counted in extra_logs.reward_error)")
    p.add_argument("--trace-chars", type=int, metavar="N",
                   help="/get_reward: add each sample's reward trace (Themis) to extra_logs.trace, cut to N chars "
                        "(default 0: off; OpenRLHF's client makes tensors of extra_logs, so only for clients "
                        "that read text)")
    p.add_argument("--max-batch-size", type=int, help="samples merged into one scoring batch (default 64)")
    p.add_argument("--max-wait-ms", type=float, help="longest wait for a batch to fill (default 5)")
    p.add_argument("--max-body-bytes", type=int, help="largest request body; bigger gets 413 (default 8 MiB)")
    p.add_argument("--max-concurrency", type=int, help="requests in flight before 429 (default 256)")
    p.add_argument("--max-samples-per-request", type=int, help="samples per request before 413 (default 4096)")
    p.add_argument("--request-timeout-s", type=float, help="scoring time before 504 (default 300)")
    p.add_argument("--reward-timeout-s", type=float, help="one reward call before /health says 'stuck' and requests "
                                                          "get 503 (default: --request-timeout-s)")
    p.add_argument("--max-connections", type=int, help="open connections; at the cap the longest-idle one is closed "
                                                       "(default 1024)")
    p.add_argument("--header-timeout-s", type=float, help="a request's headers must arrive within this (default 10)")
    p.add_argument("--body-timeout-s", type=float, help="a request's body must arrive within this after its headers "
                                                        "(default 60)")
    p.add_argument("--max-buffered-body-bytes", type=int, help="request bodies held at once; more get 503 "
                                                               "(default 128 MiB)")
    p.add_argument("--idempotency-cache-bytes", type=int, help="bytes of responses kept for request_id retries "
                                                               "(default 64 MiB)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_serve_rewards)


# ------------------------------------------------------------------------------------------------ train-rm / eval-rm


def _train_rm(args: argparse.Namespace) -> int:
    from align.command_configs import load_rm_config
    from align.distributed import init_from_env
    from align.rewards.training import format_accuracy_table, train_reward_model

    cfg = load_rm_config(args.config, args.overrides)
    # under torchrun (WORLD_SIZE > 1) the ranks train data-parallel; alone this is a no-op
    ctx = init_from_env(threads=cfg.train.threads or 0)
    try:
        res = train_reward_model(cfg)
    except ValueError as err:  # data errors a user can fix (missing columns, empty sources, unknown TARA group)
        raise UserError(str(err)) from None
    if not ctx.is_main:
        return 0
    print(f"trained {cfg.model.kind} reward model: {res.steps} steps in {res.train_seconds:.0f} s -> {res.output_dir}")
    ev = {k[len("eval/"):]: v for k, v in res.metrics.items() if k.startswith("eval/")}
    if ev:
        print(format_accuracy_table(ev))
    return 0


def _eval_rm(args: argparse.Namespace) -> int:
    from align.command_configs import load_rm_config
    from align.rewards.training import evaluate_reward_model, format_accuracy_table

    target = Path(args.target)
    cfg = None
    if target.is_file():
        cfg = load_rm_config(target, args.overrides)
        checkpoint, sources = Path(cfg.output_dir), args.data or cfg.data.eval
    elif target.is_dir():
        checkpoint, sources = target, args.data
        if (target / "rm_config.json").is_file():  # the config it was trained with, through the same machinery
            cfg = load_rm_config(target / "rm_config.json", args.overrides)
    else:
        raise UserError(f"{target} is neither an RM config file nor a checkpoint directory")
    if not sources:
        raise UserError("no evaluation data: pass --data tara:calendar,weather (or a JSONL file / hf:NAME)")
    try:
        result = evaluate_reward_model(checkpoint, sources, cfg=cfg, limit=args.limit)
    except ValueError as err:
        raise UserError(str(err)) from None
    print(format_accuracy_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def register_train_rm(subparsers) -> None:
    p = subparsers.add_parser("train-rm", help="train a reward model (classifier RM or Themis) on preference pairs",
                              description="Train a reward model: pairwise Bradley-Terry for classifier RMs, "
                                          "lm + 0.5 * BT for Themis (model.kind: themis). Prints pairwise accuracy. Under "
                                          "torchrun (torchrun --nproc-per-node N -m align.cli train-rm CONFIG) the "
                                          "ranks train data-parallel: the same steps, each rank a share of every batch.")
    p.add_argument("config", help="RM config YAML (see examples/configs/rm_*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-5 (repeatable)")
    p.set_defaults(func=_train_rm)


def register_eval_rm(subparsers) -> None:
    p = subparsers.add_parser("eval-rm", help="pairwise accuracy of a reward model, per tool group",
                              description="Evaluate a trained reward model (classifier or Themis, detected from the "
                                          "checkpoint) on preference pairs; Themis runs its tool-calling trace loop.")
    p.add_argument("target", help="an RM config (its output_dir is evaluated) or a checkpoint directory")
    p.add_argument("--data", action="append", metavar="SOURCE",
                   help="tara:GROUP[,GROUP] (test split), a JSONL file or hf:NAME[:SPLIT]; repeatable "
                        "(default: the config's data.eval)")
    p.add_argument("--limit", type=int, help="at most this many pairs per source")
    p.add_argument("--json", help="also write the result as JSON here")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the RM config, e.g. --set data.observations=gold (repeatable)")
    p.set_defaults(func=_eval_rm)


# ------------------------------------------------------------------------------------------------ all commands

REGISTER_FUNCTIONS = [register_serve_rewards, register_train_rm, register_eval_rm]


def register(subparsers) -> None:
    for register_command in REGISTER_FUNCTIONS:
        register_command(subparsers)
