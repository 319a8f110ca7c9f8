"""EventFollower against a real, private ``redis-server`` that goes away and comes back: the
mode a server's /ready reports follows Redis, and events flow again once it is back."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from adapters_store.events import EventFollower, publish_event
from tests.support.processes import free_port


class PrivateRedis:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is required for this test")
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(args, cwd=self.workdir, stdout=subprocess.DEVNULL)
        assert eventually(lambda: _pings(self.url), 20), "private redis-server did not start"

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def eventually(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    yield server
    server.stop()


def test_the_follower_polls_while_redis_is_away_and_follows_events_when_it_is_back(
    private_redis: PrivateRedis, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    events: list[float] = []
    stop = threading.Event()
    follower = EventFollower(private_redis.url, root, lambda: events.append(time.monotonic()), retry_s=0.2)
    thread = follower.start(stop)
    try:
        time.sleep(0.5)  # Redis was never there: the server starts polling
        assert follower.mode == "polling"

        private_redis.start()
        assert eventually(lambda: follower.mode == "redis", 10)
        assert eventually(lambda: publish_event(private_redis.url, root, {"op": "x"}) == 1, 5)
        assert eventually(lambda: len(events) == 1, 5)

        private_redis.stop()  # Redis goes away while subscribed
        assert eventually(lambda: follower.mode == "polling", 20)

        private_redis.start()  # ... and comes back empty (no persistence)
        assert eventually(lambda: follower.mode == "redis", 10)
        assert eventually(lambda: publish_event(private_redis.url, root, {"op": "y"}) == 1, 5)
        assert eventually(lambda: len(events) == 2, 5)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
