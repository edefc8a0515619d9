"""`align submit CONFIG --address http://HEAD:8265 [--working-dir .]`: run `align train` as a Ray job.

The job's entrypoint is `python -m align.cli train CONFIG [--set ...]`, run in `--working-dir` uploaded to the
cluster (the config path is taken relative to it). Logs stream back until the job ends; the exit status is
0 for SUCCEEDED, 1 for FAILED / STOPPED. `--pip` adds packages to the job's runtime_env (the cluster must reach
a package index); without it the job uses the head's Python environment.

Ray >= 2.60 clusters require a token: `--token`, else $RAY_AUTH_TOKEN, else ~/.ray/auth_token (what
`ray start --head` writes); it is sent as `Authorization: Bearer ...`.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

from align.errors import UserError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXCLUDES = [".git", ".venv", "venv", "runs", "**/__pycache__", "*.pyc", ".pytest_cache"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="run `align train CONFIG` as a job on a Ray cluster (Ray Jobs API)")
    p.add_argument("config", help="the run's .yaml/.json config, inside --working-dir (a relative path is looked up "
                                  "in the current directory, then in --working-dir)")
    p.add_argument("--address", default=_default_address(),
                   help="the cluster's dashboard / Jobs API address (default $RAY_API_SERVER_ADDRESS, an http "
                        f"$RAY_ADDRESS, or {DEFAULT_ADDRESS})")
    p.add_argument("--working-dir", default=".", help="directory uploaded as the job's working directory (default .)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override passed to `align train` (repeatable)")
    p.add_argument("--pip", action="append", default=[], metavar="REQUIREMENT",
                   help="pip requirement installed for the job (repeatable; the cluster needs a package index)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable for the job")
    p.add_argument("--token", default=None, help="Ray auth token (default $RAY_AUTH_TOKEN, then ~/.ray/auth_token)")
    p.add_argument("--entrypoint", default=None, help="run this shell command instead of `align train CONFIG`")
    p.add_argument("--submission-id", default=None, help="job id to use (default: Ray picks one)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return once it is submitted")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="stop the job and exit 124 when it has not finished after this long")
    p.set_defaults(func=run_submit)


def _default_address() -> str:
    ray_address = os.environ.get("RAY_ADDRESS", "")
    return os.environ.get("RAY_API_SERVER_ADDRESS") or (ray_address if ray_address.startswith("http") else DEFAULT_ADDRESS)


def find_token(explicit: str | None) -> str | None:
    """--token, else $RAY_AUTH_TOKEN, else ~/.ray/auth_token, else None (a cluster without token auth)."""
    if explicit:
        return explicit.strip()
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path.home() / ".ray" / "auth_token"
    if path.is_file():
        return path.read_text().strip() or None
    return None


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"{flag} {item!r} must look like KEY=VALUE")
        key, value = item.split("=", 1)
        out[key] = value
    return out


def build_job(args) -> tuple[str, dict]:
    """(entrypoint, runtime_env) for the submission; validates the config locally first."""
    workdir = Path(args.working_dir).resolve()
    if not workdir.is_dir():
        raise UserError(f"--working-dir {args.working_dir!r} is not a directory")
    runtime_env: dict = {"working_dir": str(workdir), "excludes": list(EXCLUDES)}
    if args.pip:
        runtime_env["pip"] = list(args.pip)
    env = _pairs(args.env, "--env")
    if env:
        runtime_env["env_vars"] = env
    if args.entrypoint:
        return args.entrypoint, runtime_env
    from align.config import load_config

    config = Path(args.config)
    if not config.is_absolute() and not config.exists() and (workdir / config).exists():
        config = workdir / config  # given relative to the working directory, as the job will see it
    config = config.resolve()
    load_config(config, args.overrides)  # a bad config fails here, not minutes later on the cluster
    try:
        rel = config.relative_to(workdir)
    except ValueError:
        raise UserError(f"config {args.config!r} is outside --working-dir {str(workdir)!r}; move it there "
                        "(the job only sees the uploaded working directory)") from None
    cmd = ["python", "-m", "align.cli", "train", rel.as_posix()]
    for item in args.overrides:
        cmd += ["--set", item]
    return " ".join(shlex.quote(c) for c in cmd), runtime_env


def make_client(address: str, token: str | None):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "authentication failed"
        raise UserError(f"the cluster at {address} refused the token ({first}); pass --token, set RAY_AUTH_TOKEN, "
                        "or copy the head's ~/.ray/auth_token") from None
    except (ConnectionError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot reach the Ray Jobs API at {address}: {first} (start the head with "
                        "`ray start --head --dashboard-host 0.0.0.0` and pass --address http://HEAD:8265; "
                        "give --token if the cluster uses token auth)") from None


async def _tail(client, job_id: str, out) -> None:
    async for lines in client.tail_job_logs(job_id):
        out.write(lines)
        out.flush()


def follow(client, job_id: str, timeout: float | None, out=sys.stdout) -> str:
    """Stream the job's logs until it ends (or `timeout`); returns its final status name."""
    try:
        asyncio.run(asyncio.wait_for(_tail(client, job_id, out), timeout))
    except asyncio.TimeoutError:
        client.stop_job(job_id)
        return "TIMEOUT"
    except RuntimeError:
        pass  # the log stream closed early: fall back to polling the status
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        status = client.get_job_status(job_id).value  # JobStatus is a str Enum
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            client.stop_job(job_id)
            return "TIMEOUT"
        time.sleep(1.0)


def run_submit(args) -> int:
    entrypoint, runtime_env = build_job(args)
    client = make_client(args.address, find_token(args.token))
    try:
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=args.submission_id)
    except (RuntimeError, ValueError) as err:  # Ray's HTTP errors and runtime_env validation
        lines = [x for x in str(err).splitlines() if x.strip()]
        raise UserError(f"the cluster refused the job: {lines[0] if lines else err}") from None
    print(f"submitted job {job_id} to {args.address}: {entrypoint}", file=sys.stderr, flush=True)
    if args.no_wait:
        print(job_id)
        return 0
    status = follow(client, job_id, args.timeout)
    print(f"job {job_id} {status}", file=sys.stderr, flush=True)
    if status == "TIMEOUT":
        return 124
    return 0 if status == "SUCCEEDED" else 1
