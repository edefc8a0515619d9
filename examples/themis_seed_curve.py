"""The early LM-loss curve of the Themis RMs of examples/themis_tara_check.py, per seed and training setting.

Why (docs/experiments/themis_tara.md, session 15): in session 13's weather run one seed of three (seed 7)
never learnt to copy the city into its call (final LM loss 0.449 against 0.08), with the same base and data;
only the seed (value-head init, batch order) differed. Whether such a seed is lost early, and whether a lower
learning rate or a longer warmup keeps it, shows in the first few hundred steps of the full schedule. This
trains each (seed, setting) Themis RM on the run's own base and data (an OUT of themis_tara_check.py whose
rm-base job has finished), exactly as that script does (`align train-rm` on --rm-ranks gloo ranks, the same
config; only the learning rate and warmup share may differ), stops it after --stop-at steps of the full
--steps schedule, and prints the LM loss (mean over windows of --window steps) side by side.

    python examples/themis_seed_curve.py --out runs/tara_weather_s15 --seeds 6 7 --stop-at 250
    python examples/themis_seed_curve.py --out runs/tara_weather_s15 --seeds 7 --rm-lr 1e-3 --stop-at 250
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rltaf_rms import rm_settings  # noqa: E402


def run_params(out: Path) -> dict[str, Any]:
    """The run's settings: the rm-base job's key (every setting of themis_tara_check.py, its call budget too)."""
    return json.loads((out / "jobs" / "rm-base.json").read_text())["key"]


def settings_for(out: Path, params: dict[str, Any], seed: int, lr: float, warmup: float, rm_dir: Path) -> dict[str, Any]:
    """The run's Themis train-rm config (rltaf_rms.rm_settings, as train_rm_job builds it) with this lr and warmup."""
    return rm_settings("themis", out / "rm-base", {**params, "rm_warmup": warmup}, [str(out / "data" / "train.jsonl")],
                       params["rm_steps"], lr, seed, params["rounds"], rm_dir)


def train_until(settings: dict[str, Any], ranks: int, stop_at: int, config_file: Path) -> list[dict[str, Any]]:
    """`align train-rm` on `ranks` gloo ranks (as rltaf_rms.train_on_ranks), stopped once metrics.jsonl holds
    `stop_at` steps; the step records."""
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(json.dumps(settings, indent=1))
    metrics = Path(settings["output_dir"]) / "metrics.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                             "-m", "align.cli", "train-rm", str(config_file)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        while proc.poll() is None and _steps(metrics) < stop_at:
            time.sleep(2)
        if proc.poll() not in (None, 0):
            raise RuntimeError(f"train-rm failed (exit {proc.returncode}): {proc.stderr.read()[-2000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=60)
    return [json.loads(line) for line in metrics.read_text().splitlines()[:stop_at]]


def _steps(metrics: Path) -> int:
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def windows(records: list[dict[str, Any]], key: str, width: int) -> list[float]:
    """The mean of `key` over consecutive windows of `width` steps."""
    return [sum(r[key] for r in records[i:i + width]) / len(records[i:i + width]) for i in range(0, len(records), width)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="a themis_tara_check.py OUT whose rm-base job finished")
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("--rm-lr", type=float, default=None, help="default: the run's")
    ap.add_argument("--warmup", type=float, default=None, help="warmup share of the schedule; default: the run's")
    ap.add_argument("--stop-at", type=int, default=250)
    ap.add_argument("--window", type=int, default=25)
    ap.add_argument("--rm-ranks", type=int, default=2)
    args = ap.parse_args(argv)
    if not (args.out / "jobs" / "rm-base.json").is_file():
        ap.error(f"{args.out}: no finished rm-base job; run examples/themis_tara_check.py --out {args.out} first")
    params = run_params(args.out)
    lr = args.rm_lr if args.rm_lr is not None else params["rm_lr"]
    warmup = args.warmup if args.warmup is not None else params.get("rm_warmup", 0.05)
    if not (lr > 0 and 0 <= warmup < 1 and 1 <= args.stop_at <= params["rm_steps"]):
        ap.error(f"--rm-lr {lr} --warmup {warmup} --stop-at {args.stop_at}: give lr > 0, warmup in [0, 1), "
                 f"1 <= stop-at <= {params['rm_steps']}")
    curves = {}
    for seed in args.seeds:
        name = f"seed{seed}-lr{lr:g}-warmup{warmup:g}"
        rm_dir = args.out / "curves" / name
        if _steps(rm_dir / "metrics.jsonl") >= args.stop_at:  # measured before: read back
            recs = [json.loads(line) for line in (rm_dir / "metrics.jsonl").read_text().splitlines()[:args.stop_at]]
        else:
            shutil.rmtree(rm_dir, ignore_errors=True)
            t0 = time.perf_counter()
            recs = train_until(settings_for(args.out, params, seed, lr, warmup, rm_dir), args.rm_ranks,
                               args.stop_at, args.out / "curves" / f"{name}.train-rm.json")
            print(f"{name}: {len(recs)} steps in {time.perf_counter() - t0:.0f} s", flush=True)
        curves[name] = {"lm_loss": windows(recs, "lm_loss", args.window), "rm_loss": windows(recs, "rm_loss", args.window),
                        "grad_norm": windows(recs, "grad_norm", args.window), "lr_end": recs[-1]["lr"]}
    saved = args.out / "curves" / "curves.json"  # every (seed, setting) measured in this OUT so far
    saved.write_text(json.dumps({**(json.loads(saved.read_text()) if saved.is_file() else {}), **curves}, indent=1))
    print(f"LM loss, mean per {args.window} steps (steps 1-{args.window}, ...):")
    for name, c in curves.items():
        print(f"{name:28s} " + " ".join(f"{v:.3f}" for v in c["lm_loss"]))
    print("RM loss:")
    for name, c in curves.items():
        print(f"{name:28s} " + " ".join(f"{v:.3f}" for v in c["rm_loss"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
