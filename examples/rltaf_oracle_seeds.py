"""The oracle GRPO arm of examples/rltaf.py on several seeds and settings, from the finished run's SFT models:
held-out greedy accuracy (what the experiment reports) and the exact expected sampled accuracy (GRPO's own
objective at temperature 1: mean p(right answer + EOS | question)), each paired by seed against SFT with a
95% t-interval; CPU time per arm.

    python examples/rltaf_oracle_seeds.py runs/rltaf --seeds 0 1 2 --dir runs/rltaf-oracle-seeds \\
        --setting old rl_lr=5e-4 --setting warm rl_lr=3e-5 rl_warmup=10
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rltaf  # noqa: E402
import rltaf_report as report  # noqa: E402
import rltaf_task as task  # noqa: E402
from rltaf_oracle_probe import measure  # noqa: E402


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(out: Path, seeds: list[int], settings: dict[str, dict[str, Any]], root: Path) -> dict[str, Any]:
    import align

    held = task.split_questions()["heldout"]
    res: dict[str, Any] = {"seeds": seeds, "settings": settings, "sft": {}, "arms": {}}
    for seed in seeds:
        res["sft"][seed] = measure(out / f"seed{seed}" / "sft-model", held)
    for name, sizes in settings.items():
        p = {**rltaf.DEFAULTS, **sizes}
        rows = {}
        for seed in seeds:
            run_dir = root / f"{name}-seed{seed}"
            t0, c0 = time.perf_counter(), cpu()
            align.train(rltaf.rl_config("grpo", "oracle", out / f"seed{seed}" / "sft-model",
                                        out / f"seed{seed}" / "rl_prompts.jsonl", run_dir, seed, p["rl_steps"], out, p))
            wall, c = time.perf_counter() - t0, cpu() - c0
            final = sorted((run_dir / "checkpoints").glob("step-*"), key=lambda d: int(d.name.split("-")[1]))[-1]
            rows[seed] = {**measure(final, held), "train_wall_s": wall, "train_cpu_s": c}
            print(name, seed, json.dumps(rows[seed]), flush=True)
        summary = {k: report.t_interval([100 * (rows[s][k] - res["sft"][s][k]) for s in seeds])
                   for k in ("greedy", "expected_sampled")}
        res["arms"][name] = {"per_seed": rows, "vs_sft_points": summary}
        print(name, json.dumps(summary), flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--dir", default="runs/rltaf-oracle-seeds")
    ap.add_argument("--setting", nargs="+", action="append", default=[], metavar="NAME KEY=VALUE")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    settings = {s[0]: {k: type(rltaf.DEFAULTS[k])(v) for k, _, v in (kv.partition("=") for kv in s[1:])}
                for s in args.setting}
    res = run(Path(args.out), args.seeds, settings, Path(args.dir))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
