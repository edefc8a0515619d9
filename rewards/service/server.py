"""Running the service: the loopback / token bind check, a background `ServerThread` and `serve` (the CLI's
`align serve-rewards` entry point)."""
from __future__ import annotations

import ipaddress
import logging
import resource
import time
from typing import Any, Callable

from fastapi import FastAPI

from align.rewards.base import as_reward_function
from align.rewards.service.app import create_app
from align.rewards.service.logs import install_rate_limit, remove_rate_limit
from align.rewards.service.protocol import guarded_protocol
from align.rewards.service.settings import ServiceSettings

log = logging.getLogger("align.rewards.service")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None, no_auth: bool = False) -> None:
    """Refuse to expose the service beyond loopback without a token unless `no_auth` asks for exactly that
    (one line, names the fix). A token together with no_auth is a contradiction, refused too."""
    if no_auth and token:
        raise ValueError("--no-auth and a token were both given; drop --no-auth (clients send "
                         "'Authorization: Bearer <token>') or the token")
    if not is_loopback(host) and not token and not no_auth:
        raise ValueError(f"refusing to serve rewards on {host} without a token; pass --token TOKEN (or "
                         "--token-file), bind --host 127.0.0.1, or, for clients that send no header (OpenRLHF) on "
                         "a trusted network, --no-auth")


def ensure_fd_limit(settings: ServiceSettings) -> None:
    """Raise the soft RLIMIT_NOFILE to what the connection limits can take (max_connections + backlog + 64),
    so the cap, not accept() failing with EMFILE, is what bounds connections; refuse if the hard limit is lower."""
    need = settings.fds_needed
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise ValueError(f"max_connections {settings.max_connections} with backlog {settings.backlog} needs "
                             f"{need} file descriptors but the hard limit (ulimit -Hn) is {hard}; lower "
                             "--max-connections or raise the limit")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def uvicorn_config(app: FastAPI, host: str, port: int, log_level: str = "info", access_log: bool = False):
    """uvicorn.Config with the app's connection limits (GuardedH11Protocol), keep-alive and backlog."""
    import uvicorn

    settings: ServiceSettings = app.state.settings
    ensure_fd_limit(settings)
    # ws="none": no WebSocket upgrade, which would leave the guarded protocol and its deadlines
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log, lifespan="on",
                          http=guarded_protocol(settings, app.state.metrics), ws="none",
                          timeout_keep_alive=settings.keep_alive_s, backlog=settings.backlog)


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
        self.server = uvicorn.Server(uvicorn_config(app, host, port, log_level))
        settings = app.state.settings
        self.limiter = install_rate_limit(settings.log_lines_per_interval, settings.log_interval_s)
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
        remove_rate_limit(self.limiter)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(reward: Any, host: str = "127.0.0.1", port: int = 8000, token: str | None = None, *,
          no_auth: bool = False, log_level: str = "info", access_log: bool = False, reward_factory: Callable[[], Any] | None = None,
          **app_kwargs: Any) -> None:
    """Serve `reward` with uvicorn until interrupted. app_kwargs are ServiceSettings fields (`create_app`);
    `reward_factory` builds a replacement reward when a call is stuck. Off loopback a token is required unless
    `no_auth` (then a warning at start-up)."""
    import uvicorn

    check_bind(host, token, no_auth)
    if no_auth and not is_loopback(host):
        # asked for by name, still said at every start: anyone who can reach the port can score and read /metrics
        log.warning("serving rewards on %s WITHOUT authentication (--no-auth): anyone who can reach port %d can "
                    "score and read /metrics; use it only on a trusted network", host, port)
    reward = as_reward_function(reward)
    app = create_app(reward, token=token, reward_factory=reward_factory, **app_kwargs)
    settings = app.state.settings
    try:
        config = uvicorn_config(app, host, port, log_level, access_log)
        install_rate_limit(settings.log_lines_per_interval, settings.log_interval_s)
        log.info("serving reward %r on http://%s:%d (auth %s)", reward.name, host, port, "on" if token else "off")
        uvicorn.Server(config).run()
    finally:
        app.state.batcher.reward.close()  # the reward in use: a restart may have replaced the first one
