"""Running the service: the loopback / token bind check, a background `ServerThread` and `serve` (the CLI's
`align serve-rewards` entry point)."""
from __future__ import annotations

import ipaddress
import logging
import time
from typing import Any

from fastapi import FastAPI

from align.rewards.base import as_reward_function
from align.rewards.service.app import create_app

log = logging.getLogger("align.rewards.service")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to expose the service beyond loopback without a token (one line, names the fix)."""
    if not is_loopback(host) and not token:
        raise ValueError(f"refusing to serve rewards on {host} without a token; pass --token TOKEN "
                         "(or bind --host 127.0.0.1)")


class ServerThread:
    """Runs an app with uvicorn in a background thread (tests, notebooks, the CPU demo):
    `with ServerThread(create_app(reward)) as url: ...`. port=0 picks a free port."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port = host, port
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                                    lifespan="on"))
        self.thread = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> str:
        import threading

        self.thread = threading.Thread(target=self.server.run, daemon=True, name="reward-service")
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the reward service did not start on {self.url}")
            time.sleep(0.01)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(10)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(reward: Any, host: str = "127.0.0.1", port: int = 8000, token: str | None = None, *,
          log_level: str = "info", access_log: bool = False, **app_kwargs: Any) -> None:
    """Serve `reward` with uvicorn until interrupted. app_kwargs go to `create_app`."""
    import uvicorn

    check_bind(host, token)
    reward = as_reward_function(reward)
    app = create_app(reward, token=token, **app_kwargs)
    log.info("serving reward %r on http://%s:%d (auth %s)", reward.name, host, port, "on" if token else "off")
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log)
    finally:
        reward.close()
