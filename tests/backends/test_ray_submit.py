"""`align submit` against a real Ray head started on loopback with token authentication.

The head runs with its own HOME (so its token is written to a fresh ~/.ray/auth_token) and its own temp dir;
`align submit` runs with that HOME and without RAY_AUTH_MODE, so the token must come from align's own lookup.
Only the processes this test started are stopped (the head's process group, then anything left that runs
from its temp dir): `ray stop --force` would also stop other Ray clusters of this user.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray.job_submission")

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_using(path: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if path.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
    temp_dir = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's unix sockets live under it
    port, dash = free_port(), free_port()
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    log = open(home / "head.log", "wb")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true", "--num-cpus=2",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 150
        import urllib.error
        import urllib.request

        while True:  # the Jobs API answers once the dashboard is up
            if head.poll() is not None:
                raise RuntimeError(f"ray start --head exited: {(home / 'head.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # 401 without a token: the server is up
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("the Ray head's dashboard did not come up in 150 s") from None
                time.sleep(1)
        yield {"address": address, "home": home}
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        for pid in _pids_using(temp_dir) + ([head.pid] if head.poll() is None else []):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(args, home, timeout=300):
    env = {**os.environ, "HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}"}
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS"):
        env.pop(key, None)
    return subprocess.run([str(BIN / "align"), "submit", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_submit_runs_a_training_job(ray_head, tmp_path):
    from align.testing import make_tiny_model

    work = tmp_path / "job"
    make_tiny_model(work / "model")
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+1="}) + "\n" for i in range(4)))
    (work / "cfg.yaml").write_text(
        "algorithm: grpo\n"
        "model: {path: model}\n"
        "data: {path: prompts.jsonl}\n"
        "reward: {functions: [{name: format, kwargs: {pattern: '[0-9]'}}]}\n"
        "rollout: {max_new_tokens: 4}\n"
        "algo: {group_size: 2}\n"
        "train: {steps: 1, prompts_per_step: 2, seed: 0}\n"
        "logging: {run_dir: runs/job, progress: false}\n"
        "checkpoint: {save_final: false}\n")
    out = _submit(["cfg.yaml", "--address", ray_head["address"], "--working-dir", str(work),
                   "--set", "train.lr=1e-4", "--timeout", "240"], ray_head["home"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "SUCCEEDED" in out.stderr
    assert '"run_dir": "runs/job"' in out.stdout  # the job's own output, streamed back
    assert "step    1" in out.stdout  # align train's per-step line

    from ray.job_submission import JobSubmissionClient

    token = (ray_head["home"] / ".ray" / "auth_token").read_text().strip()
    client = JobSubmissionClient(ray_head["address"], headers={"Authorization": f"Bearer {token}"})
    job = next(j for j in client.list_jobs() if j.entrypoint.endswith("train cfg.yaml --set train.lr=1e-4"))
    assert job.status.value == "SUCCEEDED"
    assert '"run_dir": "runs/job"' in client.get_job_logs(job.submission_id)


def test_submit_errors_are_one_line(ray_head, tmp_path):
    (tmp_path / "cfg.yaml").write_text("algorithm: grpo\nmodel: {path: m}\ndata: {path: d}\nreward: {functions: [format]}\n"
                                       "train: {lr: -1}\n")
    bad = _submit(["cfg.yaml", "--address", ray_head["address"], "--working-dir", str(tmp_path)], ray_head["home"])
    assert bad.returncode == 2 and "train.lr" in bad.stderr and "Traceback" not in bad.stderr

    (tmp_path / "ok.yaml").write_text("algorithm: grpo\nmodel: {path: m}\ndata: {path: d}\nreward: {functions: [format]}\n")
    wrong = _submit(["ok.yaml", "--address", ray_head["address"], "--working-dir", str(tmp_path),
                     "--token", "not-the-token"], ray_head["home"], timeout=120)
    assert wrong.returncode == 2 and "refused" in wrong.stderr and "Traceback" not in wrong.stderr
