"""Throughput of Themis scoring through `align serve-rewards` (issue 20, item 2), in pairs/s.

Builds a tiny Themis checkpoint that memorised Calendar traces (`align.testing.memorised_themis`, 2 layers x 64,
character tokenizer), serves it with `--reward themis` in a subprocess on 127.0.0.1 (OMP_NUM_THREADS=1), and
drives it with concurrent clients, each request one pair (the true date and the date a day later, 2 samples),
for each service batch size. Every sample writes its trace, calls the real Calendar.target_day tool, writes its
rationale and is scored; a response counts only if both tool calls succeeded. Reports pairs/s, latency, the
mean scoring batch, pair accuracy (positive scored above negative), the service's CPU seconds and the load
average (the machine is shared).

    python benchmarks/themis_service.py [--batch-sizes 1 8 32] [--clients 32] [--duration 20]

Writes benchmarks/results/themis_service.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from reward_service import TOKEN, batch_stats, free_port, wait_healthy  # noqa: E402

CASES = [("2023-06-01", 12), ("2021-02-25", 5), ("2020-02-27", 3), ("2019-12-30", 4)]


def build_checkpoint(out: Path) -> tuple[Path, list[dict]]:
    import torch

    from align.testing import calendar_themis_traces, memorised_themis

    torch.set_num_threads(1)
    samples = calendar_themis_traces(CASES)
    # 2 layers (the figures in BENCHMARKS.md were measured with this model)
    path = memorised_themis(out, [s["text"] for s in samples], [s["positive"] for s in samples], num_layers=2,
                            check_every=25)
    return path, samples


def start_service(model_path: Path, batch_size: int, port: int):
    import subprocess

    # cache_size 0: the clients cycle through a few pairs, and a score-cache hit would measure no scoring at all
    kwargs = {"model_path": str(model_path), "device": "cpu", "batch_size": max(1, batch_size), "tool_timeout_s": 10,
              "cache_size": 0}
    cmd = [sys.executable, "-m", "align.cli", "serve-rewards", "--reward", "themis", "--reward-kwargs", json.dumps(kwargs),
           "--port", str(port), "--max-batch-size", str(batch_size), "--max-wait-ms", "20", "--max-concurrency", "1024",
           "--log-level", "warning"]
    env = {**os.environ, "ALIGN_REWARD_TOKEN": TOKEN, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return wait_healthy(proc, port, 180)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def drive(url: str, pairs: list[tuple[str, str, str]], clients: int, duration_s: float) -> dict:
    lock = threading.Lock()
    stats = {"pairs": 0, "correct": 0, "bad": 0, "latencies": []}
    barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(idx: int) -> None:
        session, n = requests.Session(), idx
        headers = {"Authorization": f"Bearer {TOKEN}"}
        barrier.wait()
        while time.perf_counter() < stop_at[0]:
            question, pos, neg = pairs[n % len(pairs)]
            n += clients
            t0 = time.perf_counter()
            try:
                r = session.post(url + "/score", json={"prompts": [question, question], "completions": [pos, neg]},
                                 headers=headers, timeout=300)
                body = r.json() if r.ok else {}
            except requests.RequestException:
                body = {}
            dt = time.perf_counter() - t0
            infos = body.get("info") or []
            ok = len(infos) == 2 and all(c["ok"] for i in infos for c in i["tool_calls"]) and all(i["tool_calls"] for i in infos)
            with lock:
                if ok:
                    stats["pairs"] += 1
                    stats["correct"] += body["scores"][0] > body["scores"][1]
                    stats["latencies"].append(dt)
                else:
                    stats["bad"] += 1
        session.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    t_start = time.perf_counter()
    stop_at[0] = t_start + duration_s
    barrier.wait()
    for t in threads:
        t.join(duration_s + 300)
    wall = time.perf_counter() - t_start
    lat = sorted(x * 1000 for x in stats["latencies"])

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))] if lat else float("nan")

    return {"pairs": stats["pairs"], "bad_responses": stats["bad"], "wall_s": wall, "pairs_per_s": stats["pairs"] / wall,
            "pair_accuracy": stats["correct"] / stats["pairs"] if stats["pairs"] else float("nan"),
            "p50_ms": pct(50), "p90_ms": pct(90)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 8, 32], help="service --max-batch-size (samples)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load per batch size")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "themis_service.json"))
    args = ap.parse_args()

    t0, c0 = time.perf_counter(), time.process_time()
    scratch = tempfile.TemporaryDirectory(prefix="themis-bench-")  # removed at exit
    model_path, samples = build_checkpoint(Path(scratch.name))
    build = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
             "steps": json.loads((model_path / "themis.json").read_text())["memorised_steps"]}
    pairs = [(samples[i]["question"], samples[i]["answer"], samples[i + 1]["answer"]) for i in range(0, len(samples), 2)]
    results = []
    for bs in args.batch_sizes:
        port = free_port()
        proc = start_service(model_path, bs, port)
        url = f"http://127.0.0.1:{port}"
        try:
            drive(url, pairs, min(args.clients, 4), 2.0)  # warm-up
            before, cpu_before, load_before = batch_stats(url), cpu_seconds(proc.pid), os.getloadavg()
            stats = drive(url, pairs, args.clients, args.duration)
            after, cpu_after, load_after = batch_stats(url), cpu_seconds(proc.pid), os.getloadavg()
            batches = after["batches"] - before["batches"]
            samples_scored = after["mean_batch_samples"] * after["batches"] - before["mean_batch_samples"] * before["batches"]
            stats.update(max_batch_size=bs, scoring_batches=batches, mean_batch_samples=samples_scored / batches if batches else 0.0,
                         service_cpu_s=cpu_after - cpu_before, load_avg_1m=[load_before[0], load_after[0]])
            results.append(stats)
            print(f"batch {bs}: {stats['pairs_per_s']:.2f} pairs/s, p50 {stats['p50_ms']:.0f} ms, mean batch "
                  f"{stats['mean_batch_samples']:.1f}, load {load_before[0]:.2f}->{load_after[0]:.2f}", file=sys.stderr)
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except Exception:  # noqa: BLE001
                proc.kill()

    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), {platform.python_version()}, no GPU"
    out = {"benchmark": "themis_service", "clients": args.clients, "duration_s": args.duration, "machine": machine,
           "model": "memorised tiny Llama 2x64, char tokenizer", "checkpoint_build": build, "pairs": len(pairs),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nThemis through serve-rewards: {args.clients} clients x {args.duration:g} s, 1 pair/request; {machine}")
    print(f"{'max batch':>9} {'pairs/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'batch':>6} {'pair acc':>8} {'svc CPU s':>9} {'load 1m':>12}")
    for r in results:
        print(f"{r['max_batch_size']:>9d} {r['pairs_per_s']:>8.2f} {r['p50_ms']:>8.0f} {r['p90_ms']:>8.0f} "
              f"{r['mean_batch_samples']:>6.1f} {r['pair_accuracy']:>8.2f} {r['service_cpu_s']:>9.1f} "
              f"{r['load_avg_1m'][0]:>5.2f}->{r['load_avg_1m'][1]:<5.2f}")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
