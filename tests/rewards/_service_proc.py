"""The reward service in its own process, so the flood tests measure the service's own RSS and file descriptors.

`python tests/rewards/_service_proc.py PORT SETTINGS_JSON NOFILE` serves `Echo` (score = len(completion), info echoes
the completion, so a response is as large as its request) on 127.0.0.1:PORT with RLIMIT_NOFILE = NOFILE.
Settings the service does not know are dropped (and named on stderr), so the same flood tests run unchanged
against the pre-fix code and show what it did.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _main() -> None:
    from align.rewards.base import RewardFunction, RewardOutput
    from align.rewards.service import ServiceSettings, serve

    class Echo(RewardFunction):
        name = "echo"

        def score(self, prompts, completions, **columns):
            return RewardOutput(scores=[float(len(c)) for c in completions], info=[{"echo": c} for c in completions])

    port, settings, nofile = int(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, max(nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1])))
    known = {f.name for f in dataclasses.fields(ServiceSettings)}
    dropped = sorted(set(settings) - known)
    if dropped:
        print(f"_service_proc: this service has no settings {dropped}; running without them", file=sys.stderr, flush=True)
    serve(Echo(), host="127.0.0.1", port=port, log_level="warning",
          **{k: v for k, v in settings.items() if k in known})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """`with ServiceProcess(settings) as svc:` svc.url, svc.rss_mb(), svc.peak_rss_mb(), svc.open_fds(), svc.log_bytes()."""

    def __init__(self, settings: dict, nofile: int = 4096, log_path: Path | None = None):
        self.settings, self.nofile, self.port = settings, nofile, free_port()
        self.log_path = log_path

    def __enter__(self) -> "ServiceProcess":
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
        self.log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, __file__, str(self.port), json.dumps(self.settings), str(self.nofile)],
                                     stdout=self.log, stderr=self.log, env=env, cwd=REPO)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the service did not start within 60 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        if self.log is not subprocess.DEVNULL:
            self.log.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _status_kb(self, field: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def rss_mb(self) -> float:
        return self._status_kb("VmRSS") / 1024

    def peak_rss_mb(self) -> float:
        """VmHWM: the highest RSS the process ever had (so a spike between two samples is not missed)."""
        return self._status_kb("VmHWM") / 1024

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def log_bytes(self) -> int:
        return self.log_path.stat().st_size if self.log_path else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _main()
