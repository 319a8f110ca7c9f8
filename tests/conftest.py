"""Shared fixtures: the embedded base model and, once per test session, a real Lamina server
(uvicorn + vLLM on the CPU) started as a subprocess on a free port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from server.settings import ServerSettings

REPO = Path(__file__).resolve().parents[1]
SERVER_START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    path = ServerSettings().model
    assert (path / "config.json").exists(), f"embedded model missing at {path}"
    return path


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


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    running = start_server({}, log_path)
    yield running
    stop_server(running)
