"""How Lamina's processes are started, waited for and stopped (server/processes.py), with real
processes and signals and small Python programs standing in for the server: a Ctrl-C to the
group stops a process and its children, stragglers (in the group or out of it) are killed and
reported, a server is ready once its endpoint answers, and one that dies or never answers is an
error carrying its log."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from server import processes
from server.processes import ProcessFailed, free_port, lamina_env, spawn, stop_process, wait_ready

# A parent with one child, both printing their pid; with "stubborn" both ignore SIGINT and the
# child also leaves the process group (as vLLM's engine core does), so only a kill stops them.
FAMILY = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    stubborn = sys.argv[1] == "stubborn"
    if stubborn:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    child_code = (
        "import os, signal, time\\n"
        + ("signal.signal(signal.SIGINT, signal.SIG_IGN); os.setpgid(0, 0)\\n" if stubborn else "")
        + "time.sleep(120)"
    )
    child = subprocess.Popen([sys.executable, "-c", child_code])
    print(os.getpid(), child.pid, flush=True)
    time.sleep(120)
    """
)


def start_family(tmp_path: Path, kind: str) -> tuple[subprocess.Popen, int]:
    started = spawn("family", [sys.executable, "-c", FAMILY, kind], {}, tmp_path / "family.log")
    deadline = time.monotonic() + 20
    while not (text := (tmp_path / "family.log").read_text()).strip():
        assert time.monotonic() < deadline, "the stand-in never started"
        time.sleep(0.05)
    _, child = map(int, text.split())
    return started.process, child


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_ctrl_c_to_the_group_stops_a_process_and_its_child_and_kills_nothing(tmp_path: Path) -> None:
    process, child = start_family(tmp_path, "obedient")
    assert stop_process(process, timeout_s=10, grace_s=5) == []
    assert process.returncode is not None and gone(child)


def test_stragglers_in_and_out_of_the_group_are_killed_and_reported(tmp_path: Path) -> None:
    process, child = start_family(tmp_path, "stubborn")
    started = time.monotonic()
    killed = stop_process(process, timeout_s=1, grace_s=1)
    assert sorted(p.pid for p in killed) == sorted([process.pid, child])
    assert time.monotonic() - started < 15
    assert process.returncode is not None
    deadline = time.monotonic() + 5
    while not gone(child):
        assert time.monotonic() < deadline, "the child outside the group was left running"
        time.sleep(0.05)


def test_a_server_is_ready_once_its_endpoint_answers(tmp_path: Path) -> None:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "http.server",
        str(port),
        "--bind",
        "127.0.0.1",
        "--directory",
        str(tmp_path),
    ]
    server = spawn("http", command, {}, tmp_path / "http.log", url=f"http://127.0.0.1:{port}")
    with processes.running(server):
        assert wait_ready(server, "/", timeout_s=30) >= 0
        assert server.process.poll() is None
    assert server.process.returncode is not None  # running() stopped it


def test_a_server_that_exits_fails_with_its_log(tmp_path: Path) -> None:
    code = "import sys; print('LAMINA_MODEL holds no model', file=sys.stderr); sys.exit(2)"
    server = spawn(
        "broken", [sys.executable, "-c", code], {}, tmp_path / "broken.log", url="http://127.0.0.1:9"
    )
    with pytest.raises(ProcessFailed, match=r"(?s)broken exited with 2:.*LAMINA_MODEL holds no model"):
        wait_ready(server, timeout_s=30)


def test_a_server_that_never_answers_is_stopped_and_fails(tmp_path: Path) -> None:
    code = "import time; print('loading', flush=True); time.sleep(120)"
    url = f"http://127.0.0.1:{free_port()}"
    server = spawn("silent", [sys.executable, "-c", code], {}, tmp_path / "silent.log", url=url)
    with pytest.raises(ProcessFailed, match=r"(?s)silent not ready after 2 s:.*loading"):
        wait_ready(server, timeout_s=2)
    assert server.process.returncode is not None


def test_a_ctrl_c_while_waiting_stops_the_server_it_was_waiting_for(tmp_path: Path) -> None:
    """The server runs in its own session, so the caller's Ctrl-C reaches only the caller: the
    wait must stop it, or a benchmark interrupted during start-up leaves an engine running."""
    code = "import time; print('loading', flush=True); time.sleep(120)"
    url = f"http://127.0.0.1:{free_port()}"
    server = spawn("slow", [sys.executable, "-c", code], {}, tmp_path / "slow.log", url=url)

    def ctrl_c(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, ctrl_c)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        with pytest.raises(KeyboardInterrupt):
            wait_ready(server, timeout_s=60)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert server.process.returncode is not None, "the server outlived the interrupted wait"


def test_a_log_is_replaced_or_appended_to(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "p.log"
    for append, word in ((False, "one"), (True, "two"), (False, "three"), (True, "four")):
        started = spawn("p", [sys.executable, "-c", f"print({word!r})"], {}, log, append=append)
        assert started.process.wait(timeout=30) == 0
    assert log.read_text().split() == ["three", "four"]


def test_the_environment_reaches_the_process_over_this_ones(tmp_path: Path) -> None:
    env = lamina_env(tmp_path / "home", tmp_path / "store", max_lora_rank=128)
    assert env == {
        "LAMINA_HOME": str(tmp_path / "home"),
        "LAMINA_STORE": str(tmp_path / "store"),
        "LAMINA_MAX_LORA_RANK": "128",
    }
    code = "import os; print(os.environ['LAMINA_MAX_LORA_RANK'], os.environ['PYTHONUNBUFFERED'], os.environ['PATH'] != '')"
    started = spawn("env", [sys.executable, "-c", code], env, tmp_path / "env.log")
    assert started.process.wait(timeout=30) == 0
    assert started.log_tail().split() == ["128", "1", "True"]


def test_the_worker_command_is_the_workers_own_entry_point() -> None:
    """``python -m trainer`` is ``lamina-worker``: its help, without starting Celery."""
    shown = subprocess.run([*processes.WORKER_COMMAND, "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "Run the training worker" in shown.stdout


def test_a_process_started_by_a_parent_that_ignores_ctrl_c_still_obeys_it(tmp_path: Path) -> None:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell's background job is
    try:
        process, child = start_family(tmp_path, "obedient")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stop_process(process, timeout_s=10, grace_s=5) == []
    assert process.returncode is not None and gone(child)
