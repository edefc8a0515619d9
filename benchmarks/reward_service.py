"""Load test of the reward service (`align serve-rewards`) over loopback.

Starts the service in a subprocess on 127.0.0.1 for each configuration, drives it with N concurrent client
threads (each with its own HTTP session) for a bounded duration, and reports throughput and latency
percentiles. Configurations, side by side: dynamic batching on and off (max_batch_size 1 = one request per
scoring call, the way a handler that scores inline behaves), for a cheap rule reward (`format`) and for
`math_verify` (sympy in a child process for the symbolic answers).

    python benchmarks/reward_service.py [--clients 64] [--duration 10] [--samples-per-request 4]

Prints a table last and writes benchmarks/results/reward_service.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-token"

# (completion, label): mostly numeric answers (fast path), some symbolic ones (sympy child), some wrong
MATH_ITEMS = [
    (r"The answer is \boxed{\frac{1}{2}}", "0.5"),
    ("So she has 72 clips.\n#### 72", "72"),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}"),
    (r"\boxed{(x+1)^2}", "x^2+2x+1"),
    (r"\boxed{17}", "18"),
    ("I do not know.", "3"),
    (r"\boxed{\$1,250}", "1250"),
    (r"\boxed{\pi/3}", r"\frac{\pi}{3}"),
]
FORMAT_ITEMS = [("<think>short reasoning</think> <answer>42</answer>", "42"), ("42", "42")]

CONFIGS = [
    {"name": "format, batched", "reward": "format", "max_batch_size": 64, "max_wait_ms": 5},
    {"name": "format, unbatched", "reward": "format", "max_batch_size": 1, "max_wait_ms": 0},
    {"name": "math_verify, batched", "reward": "math_verify", "max_batch_size": 64, "max_wait_ms": 5},
    {"name": "math_verify, unbatched", "reward": "math_verify", "max_batch_size": 1, "max_wait_ms": 0},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(cfg: dict, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "align.cli", "serve-rewards", "--reward", cfg["reward"], "--host", "127.0.0.1",
           "--port", str(port), "--max-batch-size", str(cfg["max_batch_size"]), "--max-wait-ms", str(cfg["max_wait_ms"]),
           "--max-concurrency", "1024", "--log-level", "warning"]
    env = {**os.environ, "ALIGN_REWARD_TOKEN": TOKEN}  # the token never appears on the command line
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return wait_healthy(proc, port, 120)


def wait_healthy(proc, port: int, timeout_s: float):
    """`proc` (a started `align serve-rewards`) once its /health answers 200; an error if it exits or is late."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except requests.RequestException:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"service did not start within {timeout_s:g} s")


def payload(items, k: int, offset: int) -> dict:
    chosen = [items[(offset + j) % len(items)] for j in range(k)]
    return {"prompts": ["Solve the problem."] * k, "completions": [c for c, _ in chosen],
            "metadata": {"label": [y for _, y in chosen]}}


def drive(url: str, items, clients: int, duration_s: float, k: int) -> dict:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    sample_errors = [0]
    lock = threading.Lock()
    start_barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(idx: int) -> None:
        session = requests.Session()
        headers = {"Authorization": f"Bearer {TOKEN}"}
        n = idx
        start_barrier.wait()
        while time.perf_counter() < stop_at[0]:
            body = payload(items, k, n)
            n += clients
            t0 = time.perf_counter()
            try:
                r = session.post(url + "/score", json=body, headers=headers, timeout=60)
                code, errs = r.status_code, (sum(e is not None for e in r.json().get("errors", [])) if r.ok else 0)
            except requests.RequestException:
                code, errs = -1, 0
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                statuses[code] = statuses.get(code, 0) + 1
                sample_errors[0] += errs
        session.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    t_start = time.perf_counter()
    stop_at[0] = t_start + duration_s
    start_barrier.wait()
    for t in threads:
        t.join(duration_s + 120)
    wall = time.perf_counter() - t_start
    ok = statuses.get(200, 0)
    lat_ms = sorted(x * 1000 for x in latencies)

    def pct(p: float) -> float:
        return lat_ms[min(len(lat_ms) - 1, int(round(p / 100 * (len(lat_ms) - 1))))] if lat_ms else float("nan")

    return {"requests": len(latencies), "ok": ok, "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "sample_errors": sample_errors[0], "wall_s": wall, "req_per_s": ok / wall, "samples_per_s": ok * k / wall,
            "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "max_ms": lat_ms[-1] if lat_ms else float("nan"),
            "mean_ms": statistics.fmean(lat_ms) if lat_ms else float("nan")}


def batch_stats(url: str) -> dict:
    text = requests.get(url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith(("reward_batch_size_sum", "reward_batch_size_count")):
            name, value = line.split()
            values[name] = float(value)
    count = values.get("reward_batch_size_count", 0.0)
    return {"batches": int(count), "mean_batch_samples": values.get("reward_batch_size_sum", 0.0) / count if count else 0.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of load per configuration")
    ap.add_argument("--samples-per-request", type=int, default=4)
    ap.add_argument("--only", help="run configurations whose name contains this text")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reward_service.json"))
    args = ap.parse_args()

    results = []
    for cfg in CONFIGS:
        if args.only and args.only not in cfg["name"]:
            continue
        port = free_port()
        proc = start_service(cfg, port)
        url = f"http://127.0.0.1:{port}"
        try:
            items = MATH_ITEMS if cfg["reward"] == "math_verify" else FORMAT_ITEMS
            drive(url, items, min(args.clients, 8), 1.0, args.samples_per_request)  # warm-up (sympy child, sessions)
            before = batch_stats(url)
            stats = drive(url, items, args.clients, args.duration, args.samples_per_request)
            after = batch_stats(url)
            batches = after["batches"] - before["batches"]
            stats["scoring_batches"] = batches
            stats["mean_batch_samples"] = (
                (after["mean_batch_samples"] * after["batches"] - before["mean_batch_samples"] * before["batches"]) / batches
                if batches else 0.0)
            results.append({**cfg, **stats})
            print(f"{cfg['name']}: {stats['req_per_s']:.1f} req/s, p50 {stats['p50_ms']:.1f} ms, "
                  f"p99 {stats['p99_ms']:.1f} ms", file=sys.stderr)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), {platform.python_version()}, no GPU"
    out = {"benchmark": "reward_service", "clients": args.clients, "duration_s": args.duration,
           "samples_per_request": args.samples_per_request, "machine": machine,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")

    header = f"{'configuration':<24} {'req/s':>8} {'samples/s':>10} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} " \
             f"{'max ms':>8} {'batch':>6} {'non-200':>8}"
    print(f"\nreward service load test: {args.clients} clients x {args.duration:g} s, "
          f"{args.samples_per_request} samples/request, loopback; {machine}")
    print(header)
    print("-" * len(header))
    for r in results:
        non_ok = r["requests"] - r["ok"]
        print(f"{r['name']:<24} {r['req_per_s']:>8.1f} {r['samples_per_s']:>10.1f} {r['p50_ms']:>8.1f} {r['p90_ms']:>8.1f} "
              f"{r['p99_ms']:>8.1f} {r['max_ms']:>8.1f} {r['mean_batch_samples']:>6.1f} {non_ok:>8d}")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
