"""The engine core's process-group wrapper (server/engine_process.py), with real processes and
signals but a stand-in for vLLM's entry point: a group Ctrl-C does not reach the child, the
server's group stop does, and a child whose parent is SIGKILLed stops by itself."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from server import engine_process
from tests.support.processes import REPO

# The "server": starts one engine child through run_in_own_group (fork, as vLLM does on the CPU)
# with a stand-in entry point that takes SIGINT and SIGTERM the default way (they kill it),
# prints the child's pid, survives SIGINT itself, and stops the child's group on SIGUSR1.
PARENT = textwrap.dedent(
    """
    import multiprocessing, signal, sys, time
    from server import engine_process

    def engine_entry():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(120)

    if __name__ == "__main__":
        signal.signal(signal.SIGINT, lambda *_: None)
        signal.signal(signal.SIGUSR1, lambda *_: print("stopped", engine_process.stop_engine_groups(), flush=True))
        engine_process._original = engine_entry
        child = multiprocessing.get_context("fork").Process(target=engine_process.run_in_own_group, daemon=True)
        child.start()
        print(child.pid, flush=True)
        while True:
            time.sleep(0.1)
    """
)


def own_group(pid: int, timeout: float = 10.0) -> bool:
    """True once ``pid`` leads a process group (the child moves there first thing it runs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.getpgid(pid) == pid:
            return True
        time.sleep(0.02)
    return False


def gone(pid: int, timeout: float) -> bool:
    """True once ``pid`` has exited (a zombie counts: only its new parent can reap it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def server_and_engine(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, int]]:
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group, as a shell gives a foreground job
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        assert own_group(child)
        yield parent, child
    finally:
        for pid in (parent.pid, child):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        parent.wait(timeout=10)


def test_the_engine_child_leads_its_own_group_and_a_group_ctrl_c_misses_it(
    server_and_engine: tuple[subprocess.Popen, int],
) -> None:
    parent, child = server_and_engine
    assert os.getpgid(child) == child != os.getpgid(parent.pid)  # the fixture waited for the move
    os.killpg(parent.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
    assert not gone(child, 1.0), "SIGINT to the server's group reached the engine"
    assert parent.poll() is None


def test_the_server_stops_the_engine_group_itself(server_and_engine: tuple[subprocess.Popen, int]) -> None:
    parent, child = server_and_engine
    parent.send_signal(signal.SIGUSR1)
    assert parent.stdout is not None
    assert parent.stdout.readline().split() == ["stopped", f"[{child}]"]
    assert gone(child, 5.0)


def test_an_engine_whose_server_is_killed_stops_by_itself(
    server_and_engine: tuple[subprocess.Popen, int],
) -> None:
    parent, child = server_and_engine
    os.kill(parent.pid, signal.SIGKILL)  # no handler, no cleanup: only the watchdog can notice
    parent.wait(timeout=10)
    assert gone(child, 3 * engine_process.PARENT_POLL_S + 2)


def test_the_entry_point_is_swapped_only_while_the_engine_starts() -> None:
    from vllm.v1.engine.core import EngineCoreProc

    original = EngineCoreProc.run_engine_core
    with engine_process.engine_core_in_own_group():
        assert EngineCoreProc.run_engine_core is engine_process.run_in_own_group
        assert engine_process._original is original
    assert EngineCoreProc.run_engine_core is original
    assert engine_process._original is None
