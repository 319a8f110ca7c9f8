"""Real processes for the tests: a ``lamina serve`` subprocess on a free port, stopped with
Ctrl-C like a user would, and a private ``redis-server`` a test may stop and restart. Starting,
waiting and stopping are :mod:`server.processes` (the demo and the benchmarks use it too); this
module adds what only tests want: a state directory under the test's own, and ``pytest.fail``
with the server's log instead of an exception. A library, not fixtures: test modules and
``service_stack`` import it; ``conftest`` only holds fixtures."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import redis

from server.processes import ManagedProcess, ProcessFailed, free_port
from server.processes import start_server as start_lamina_server
from tests.support.backend import stack_env

__all__ = ["REPO", "RedisServer", "RunningServer", "free_port", "start_server", "stop_server"]

REPO = Path(__file__).resolve().parents[2]
SERVER_START_TIMEOUT_S = 300

RunningServer = ManagedProcess  # what the tests call a started server
SERVER_ADMIN_KEY = "test-admin-key"  # the shared `server` fixture's admin key (tests/conftest.py)


def start_server(env_overrides: dict[str, str], log_path: Path) -> RunningServer:
    """Start ``lamina serve`` and wait for /ready; fail with the server's log if it never is.
    Its state goes under the log's directory unless ``env_overrides`` says where: never the
    repository's own var/."""
    env = stack_env({"LAMINA_HOME": str(log_path.parent / "home"), **env_overrides})
    try:
        return start_lamina_server(env, log_path, name="server", timeout_s=SERVER_START_TIMEOUT_S, cwd=REPO)
    except ProcessFailed as failed:
        pytest.fail(str(failed))


def stop_server(server: RunningServer, timeout: float = 60) -> list[psutil.Process]:
    """Ctrl-C the server like a user would; returns any of its processes still alive after."""
    return server.stop(timeout)


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
