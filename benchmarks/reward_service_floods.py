"""The red team's floods (issue 13, finding 3) against `align serve-rewards` with its DEFAULT limits.

Starts the service (`--reward format`) in a subprocess on 127.0.0.1 and, one flood at a time, reports its RSS
(peak = VmHWM from /proc), open file descriptors, log growth and whether a normal request is still answered:

1. slow bodies: 64 bodies of 7.5 MB, each sent but its last byte, held for --hold seconds;
2. byte-heavy cache: 150 requests of 4,096 samples, each with its own request_id (kept for retries);
3. idle connections: --idle sockets opened and held.

    python benchmarks/reward_service_floods.py [--hold 10] [--idle 10000]

A fresh service per flood, so each peak is that flood's own. Prints one line per flood and writes
benchmarks/results/reward_service_floods.json. docs/security.md ("Scoring service limits") quotes it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    def __init__(self, log: Path):
        self.port, self.log = free_port(), log

    def __enter__(self) -> "Service":
        self.out = open(self.log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "align.cli", "serve-rewards", "--reward", "format",
                                      "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"],
                                     stdout=self.out, stderr=self.out, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                time.sleep(0.1)
        raise RuntimeError("the service did not start")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.out.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def mb(self, field: str) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def served(self) -> str:
        try:
            return str(requests.post(self.url + "/score", json={"prompts": [""], "completions": ["42"]}, timeout=10).status_code)
        except requests.RequestException as err:
            return type(err).__name__


def slow_bodies(svc: Service, hold_s: float) -> dict:
    body = json.dumps({"prompts": ["a"], "completions": ["b" * 7_500_000]}).encode()
    socks = []
    for _ in range(64):
        s = socket.create_connection(("127.0.0.1", svc.port), timeout=10)
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                  % len(body))
        try:
            s.sendall(body[:-1])
        except OSError:
            pass
        socks.append(s)
    time.sleep(hold_s)
    out = {"fds": svc.fds(), "served_during": svc.served()}
    for s in socks:
        s.close()
    return out


def heavy_cache(svc: Service) -> dict:
    payload = {"prompts": ["q"] * 4096, "completions": ["<think>x</think> <answer>42</answer>"] * 4096}
    sizes = []
    with requests.Session() as http:
        for i in range(150):
            r = http.post(svc.url + "/score", json={**payload, "request_id": f"flood-{i}"}, timeout=60)
            sizes.append(len(r.content))
    return {"response_bytes": sum(sizes) // len(sizes), "fds": svc.fds()}


def idle(svc: Service, n: int) -> dict:
    socks = []
    for _ in range(n):
        try:
            socks.append(socket.create_connection(("127.0.0.1", svc.port), timeout=5))
        except OSError:
            break
    time.sleep(2)
    out = {"opened": len(socks), "fds": svc.fds(), "served_during": svc.served()}
    for s in socks:
        s.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hold", type=float, default=10.0, help="seconds the slow bodies are held")
    ap.add_argument("--idle", type=int, default=10_000, help="idle sockets to open")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reward_service_floods.json"))
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, flood in (("slow bodies", lambda s: slow_bodies(s, args.hold)), ("byte-heavy cache", heavy_cache),
                            ("idle connections", lambda s: idle(s, args.idle))):
            log = Path(tmp) / "service.log"
            with Service(log) as svc:
                svc.served()
                idle_mb, log_before, started = svc.mb("VmRSS"), log.stat().st_size, time.monotonic()
                row = {"flood": name, **flood(svc)}
                row.update(seconds=round(time.monotonic() - started, 1), idle_rss_mb=round(idle_mb),
                           peak_rss_mb=round(svc.mb("VmHWM")), rss_after_mb=round(svc.mb("VmRSS")),
                           log_growth_bytes=log.stat().st_size - log_before, served_after=svc.served())
            results.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                                          "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
