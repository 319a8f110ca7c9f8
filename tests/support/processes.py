"""Real processes for the tests: a ``lamina serve`` subprocess on a free port, stopped with
Ctrl-C like a user would, and a private ``redis-server`` a test may stop and restart. A library,
not fixtures: test modules and ``service_stack`` import it; ``conftest`` only holds fixtures."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import redis

REPO = Path(__file__).resolve().parents[2]
SERVER_START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def start_server(env_overrides: dict[str, str], log_path: Path) -> RunningServer:
    """Start ``lamina serve`` and wait for /ready; fail with the server's log if it never is."""
    port = free_port()
    home = {"LAMINA_HOME": str(log_path.parent / "home")}  # never the repository's own var/
    env = {**os.environ, **home, **env_overrides, "LAMINA_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    log_file = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "serve"],
        cwd=REPO,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_server(server)
    pytest.fail(f"server not ready after {SERVER_START_TIMEOUT_S} s:\n{server.log_tail()}")


def stop_server(server: RunningServer, timeout: float = 60) -> list[psutil.Process]:
    """Ctrl-C the server like a user would; returns any of its processes still alive after."""
    try:
        family = [
            psutil.Process(server.process.pid),
            *psutil.Process(server.process.pid).children(recursive=True),
        ]
    except psutil.NoSuchProcess:
        family = []
    server.process.send_signal(signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.process.wait(timeout=timeout)
    _, alive = psutil.wait_procs(family, timeout=15)
    for proc in alive:  # never leave strays behind, even when the test fails
        proc.kill()
    return alive


class RedisServer:
    """A private ``redis-server`` that a test may restart."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is required for the fault tests")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=self.workdir,
            stdout=(self.workdir / "redis.log").open("a"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url, socket_connect_timeout=1).ping():
                    return
            except redis.RedisError:
                time.sleep(0.1)
        pytest.fail("private redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=20)
            self.process = None

    def restart(self) -> None:
        """Down and up again, losing every key (queued messages, locks) in between."""
        self.stop()
        time.sleep(1.0)
        self.start()
        assert redis.Redis.from_url(self.url).dbsize() == 0
