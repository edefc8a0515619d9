"""Start N ranks of a script as torchrun does (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT), each
pinned to one torch thread, with a hard wall-clock limit: a hang kills every rank and fails the test."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], world_size: int, timeout_s: float) -> list[str]:
    """Run `python ARGS...` as `world_size` ranks; returns each rank's output; raises AssertionError naming the
    rank that failed (with its output's tail) or the timeout."""
    port = free_port()
    procs, logs = [], []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        log = tempfile.TemporaryFile()  # a file, not a pipe: a chatty rank can never block on a full pipe
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, *args], env=env, cwd=REPO, stdout=log,
                                      stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                raise AssertionError(f"ranks still running after {timeout_s:.0f} s (a hang): killed")
            if any(p.poll() not in (None, 0) for p in procs):
                time.sleep(5)  # let the other ranks notice and end on their own, then stop them
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = []
    for p, log in zip(procs, logs):
        log.seek(0)
        outputs.append(log.read().decode(errors="replace"))
        log.close()
    for rank, (p, text) in enumerate(zip(procs, outputs)):
        if p.returncode != 0:
            raise AssertionError(f"rank {rank} exited with {p.returncode}:\n{text[-4000:]}")
    return outputs
