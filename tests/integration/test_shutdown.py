"""Graceful shutdown of ``lamina serve``: SIGTERM, and Ctrl-C sent to the whole process group,
stop taking new connections, let the streams in flight finish (up to LAMINA_DRAIN_TIMEOUT_S),
then stop vLLM's processes; nothing outlives the server.

To have a stream in flight for certain when the signal arrives, however fast the machine, the
tests freeze vLLM's engine core (SIGSTOP) before the request and thaw it after the signal: the
server has sent the response's headers and no token yet.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.support.processes import RunningServer, start_server

pytestmark = pytest.mark.engine

DRAIN_S = 5  # the second test's drain timeout; the first runs with the default (30 s)


class Stream:
    """A streaming completion read in a thread: its lines, and how it ended."""

    def __init__(self, url: str, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.body = {
            "model": "base",
            "prompt": "Once upon a time",
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        self.url = url
        self.status: int | None = None
        self.lines: list[str] = []
        self.error: BaseException | None = None
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=self.body, timeout=180) as response:
                self.status = response.status_code
                self.started.set()
                for line in response.iter_lines():
                    if line:
                        self.lines.append(line)
        except httpx.HTTPError as error:
            self.error = error
        finally:
            self.started.set()

    def wait_started(self) -> None:
        assert self.started.wait(60) and self.status == 200, f"stream not started: {self.error}"

    def join(self, timeout: float = 120) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream neither finished nor was cut"

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [json.loads(line.removeprefix("data: ")) for line in self.lines if line != "data: [DONE]"]

    def assert_complete(self) -> None:
        """Every token asked for, the usage chunk, then ``[DONE]``; no error on the way."""
        assert self.error is None, self.error
        assert self.lines and self.lines[-1] == "data: [DONE]", self.lines[-3:]
        chunks = self.chunks
        assert not any("error" in chunk for chunk in chunks), chunks[-2:]
        assert chunks[-1]["usage"]["completion_tokens"] == self.max_tokens
        assert [c["finish_reason"] for chunk in chunks for c in chunk["choices"]][-1] == "length"


def engine_core(server: RunningServer) -> psutil.Process:
    for child in psutil.Process(server.process.pid).children(recursive=True):
        if "EngineCore" in child.name():
            return child
    pytest.fail("no vLLM engine core process under the server")


def wait_refused(url: str, timeout: float = 15) -> None:
    """Until a new connection to the server is refused (the server stopped listening). A
    connection that reached the listen backlog just before the socket closed is reset instead
    of refused: it is not served either, so it counts too."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/health", timeout=2)
        except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
            return
        time.sleep(0.1)
    pytest.fail("the server still accepted new connections after the signal")


def wait_for_log(server: RunningServer, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in server.log_path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    pytest.fail(f"{text!r} not in the server log after {timeout} s:\n{server.log_tail()}")


Served = tuple[RunningServer, list[psutil.Process]]


def _start(tmp_path: Path, env: dict[str, str]) -> Served:
    """A server and its whole process family (taken while it runs)."""
    server = start_server(env, tmp_path / "server.log")
    family = [
        psutil.Process(server.process.pid),
        *psutil.Process(server.process.pid).children(recursive=True),
    ]
    return server, family


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Served]]:
    """One server per test, both started at once (a start is mostly waiting for vLLM's
    processes): ``default`` drains for the default 30 s, ``short`` for DRAIN_S. Whatever is
    still alive at the end is killed, so a failing test leaves nothing behind."""
    settings = {"default": {}, "short": {"LAMINA_DRAIN_TIMEOUT_S": str(DRAIN_S)}}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {k: pool.submit(_start, tmp_path_factory.mktemp(k), env) for k, env in settings.items()}
        started = {k: f.result() for k, f in futures.items()}
    try:
        yield started
    finally:
        for _, family in started.values():
            for proc in family:
                try:
                    proc.resume()  # a frozen engine core cannot even take SIGKILL's cleanup
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass


def assert_all_exited(server: RunningServer, family: list[psutil.Process], timeout: float) -> None:
    server.process.wait(timeout=timeout)
    _, alive = psutil.wait_procs(family, timeout=15)
    assert alive == [], f"still running after the server exited: {alive}"
    assert "Application shutdown complete" in server.log_path.read_text()


def test_ctrl_c_to_the_process_group_drains_a_stream_then_leaves_no_process(
    servers: dict[str, Served],
) -> None:
    server, family = servers["default"]
    core = engine_core(server)
    assert os.getpgid(core.pid) != os.getpgid(server.process.pid), "the engine must not get the Ctrl-C"
    core.suspend()
    stream = Stream(server.url, max_tokens=48)
    stream.wait_started()
    os.killpg(server.process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    wait_refused(server.url)
    core.resume()
    stream.join()
    stream.assert_complete()
    assert_all_exited(server, family, timeout=60)
    assert "Waiting for connections to close" in server.log_path.read_text()


def test_sigterm_drains_streams_and_cuts_one_that_outlasts_the_drain_timeout(
    servers: dict[str, Served],
) -> None:
    server, family = servers["short"]
    core = engine_core(server)
    core.suspend()
    short, long = Stream(server.url, max_tokens=8), Stream(server.url, max_tokens=400)
    short.wait_started()
    long.wait_started()
    server.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    wait_refused(server.url)
    core.resume()
    short.join()
    core.suspend()  # the long stream now outlasts the drain timeout
    short.assert_complete()
    wait_for_log(server, "timeout graceful shutdown exceeded", timeout=DRAIN_S + 30)
    assert time.monotonic() - signalled >= DRAIN_S - 0.5
    core.resume()
    long.join()
    assert "data: [DONE]" not in long.lines
    assert len(long.chunks) < long.max_tokens
    assert_all_exited(server, family, timeout=60)
