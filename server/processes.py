"""Starting, waiting for and stopping Lamina's own processes (``lamina serve`` and the training
worker) as subprocesses: one way for ``lamina demo``, the tests and the benchmarks.

Each process gets a session, so a process group, of its own: vLLM and Celery start child
processes, and a signal to the group reaches all of them, as Ctrl-C in a terminal reaches a
command and its children. Stopping is what a user does: Ctrl-C (SIGINT) to the group, so the
server drains its requests and the worker finishes its shutdown. What is still alive a grace
period after that (the process and every descendant, the engine core in its own group
included, see :mod:`server.engine_process`) is killed, so nothing is ever left running behind.

The worker is started through its own entry point (``python -m trainer``, the ``lamina-worker``
command); this module runs it by command line and imports no trainer code. ``psutil`` (a
one of Lamina's runtime dependencies) finds a process's descendants.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

SERVER_COMMAND = (sys.executable, "-m", "server", "serve")
WORKER_COMMAND = (sys.executable, "-m", "trainer")  # trainer/__main__.py: lamina-worker
START_TIMEOUT_S = 600  # a first start compiles and loads the engine; a loaded machine is slow
STOP_TIMEOUT_S = 60  # the server drains requests (LAMINA_DRAIN_TIMEOUT_S) before it exits
KILL_GRACE_S = 15  # how long descendants may outlive the process before they are killed


class ProcessFailed(RuntimeError):
    """A started process exited, or never became ready; the message ends with its log's tail."""


@dataclass
class ManagedProcess:
    """A process started here: what it is, where its output goes and, for a server, its URL."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path | None  # None: it writes to this process's stdout and stderr
    url: str = ""  # where a server answers; "" for a process that serves nothing
    started_s: float = 0.0  # seconds from start to ready

    @property
    def pid(self) -> int:
        """The process's id, which is also its process group's id (it leads a session)."""
        return self.process.pid

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> list[psutil.Process]:
        """Ctrl-C it and kill stragglers (:func:`stop_process`); returns those it had to kill."""
        return stop_process(self.process, timeout_s)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def lamina_env(home: Path, store: Path | None = None, **settings: object) -> dict[str, str]:
    """``LAMINA_*`` variables for a process with its state under ``home`` (and its store at
    ``store``); ``settings`` are setting names (``max_lora_rank=128``)."""
    env = {"LAMINA_HOME": str(home)}
    if store is not None:
        env["LAMINA_STORE"] = str(store)
    env.update({f"LAMINA_{key.upper()}": str(value) for key, value in settings.items()})
    return env


def spawn(
    name: str,
    command: Sequence[str],
    env: dict[str, str],
    log_path: Path | None,
    *,
    url: str = "",
    cwd: Path | None = None,
    append: bool = False,
) -> ManagedProcess:
    """Start ``command`` in a new session with ``env`` over this process's environment, its
    output to ``log_path`` (appended to with ``append``, so a restarted process keeps the
    earlier one's lines) or, when None, to this process's own stdout and stderr."""
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    # the child holds its own copy of the log file; None inherits this process's output
    with log_path.open("a" if append else "w") if log_path else contextlib.nullcontext() as log:
        process = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT if log else None,
            start_new_session=True,
            preexec_fn=_default_stop_signals,
        )
    return ManagedProcess(name, process, log_path, url)


def _default_stop_signals() -> None:
    """In the child before exec: Ctrl-C and SIGTERM at their defaults. An ignored signal is
    inherited across exec, so a parent that ignores SIGINT (a shell's background job, a
    supervisor) would otherwise start servers and workers that no Ctrl-C can stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def wait_ready(server: ManagedProcess, path: str = "/ready", timeout_s: float = START_TIMEOUT_S) -> float:
    """Poll ``path`` until it answers 200; returns the seconds waited. Raises
    :class:`ProcessFailed` if the process exits first or never answers. On every way out but
    ready (a Ctrl-C of the caller included) it stops the process first: it runs in a session of
    its own, so a Ctrl-C in the caller's terminal never reaches it, and nothing else would."""
    started = time.monotonic()
    try:
        while time.monotonic() - started < timeout_s:
            if server.process.poll() is not None:
                raise ProcessFailed(
                    f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(server.url + path, timeout=2).status_code == 200:
                    return time.monotonic() - started
            time.sleep(0.25)
        raise ProcessFailed(f"{server.name} not ready after {timeout_s:.0f} s:\n{server.log_tail()}")
    except BaseException:
        server.stop()  # an exited server's descendants too (vLLM's engine core has its own group)
        raise


def start_server(
    env: dict[str, str],
    log_path: Path | None,
    *,
    name: str = "lamina",
    port: int | None = None,
    timeout_s: float = START_TIMEOUT_S,
    cwd: Path | None = None,
) -> ManagedProcess:
    """``lamina serve`` with ``env`` on ``port`` (default: a free one), once /ready answers."""
    port = port or free_port()
    server = spawn(
        name,
        SERVER_COMMAND,
        {**env, "LAMINA_PORT": str(port)},
        log_path,
        url=f"http://127.0.0.1:{port}",
        cwd=cwd,
    )
    server.started_s = wait_ready(server, "/ready", timeout_s)
    return server


def start_worker(
    env: dict[str, str], log_path: Path | None, *, name: str = "worker", cwd: Path | None = None
) -> ManagedProcess:
    """The training worker with ``env``; it has no endpoint to wait for (it takes jobs once
    Celery has connected). Its log is appended to, so a restarted worker keeps the old lines."""
    return spawn(name, WORKER_COMMAND, env, log_path, cwd=cwd, append=True)


def stop_process(
    process: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S, grace_s: float = KILL_GRACE_S
) -> list[psutil.Process]:
    """Ctrl-C (SIGINT) ``process``'s group, wait up to ``timeout_s`` for it to exit and
    ``grace_s`` more for its descendants, then SIGKILL whatever of them is still alive.
    Returns those it killed: empty when everything stopped by itself."""
    family = _family(process.pid)
    _signal_group(process.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout_s)
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    alive = [proc for proc in alive if _running(proc)]  # a zombie has stopped: only its reaping is late
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    if alive or process.poll() is None:  # the group still exists: its id cannot have been reused
        _signal_group(process.pid, signal.SIGKILL)  # also what started after the family was taken
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)
    return alive


@contextlib.contextmanager
def running(started: ManagedProcess) -> Iterator[ManagedProcess]:
    """Stop ``started`` on every exit path, a Ctrl-C of the caller included."""
    try:
        yield started
    finally:
        started.stop()


def _running(proc: psutil.Process) -> bool:
    """Still executing: neither gone nor a zombie waiting for its parent (or init) to reap it."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _family(pid: int) -> list[psutil.Process]:
    """The process and its descendants now (none if it is gone)."""
    try:
        leader = psutil.Process(pid)
        return [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _signal_group(group: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)
