"""vLLM's engine-core process in a process group of its own, so that the server owns its shutdown.

Ctrl-C in a terminal (or ``kill -INT -<pgid>``) sends SIGINT to every process of the foreground
process group. vLLM's engine core and its model worker handle SIGINT by stopping at once, which
cuts every stream the server is still draining. Started in their own group, they never see
that signal: the server drains its requests (``LAMINA_DRAIN_TIMEOUT_S``) and then shuts the
engine down itself, as it does after a SIGTERM.

The price of leaving the group is that a signal meant for the whole group (``kill -9 -<pgid>``)
no longer reaches the engine either, so the engine core watches its parent and stops itself
(SIGTERM, which vLLM handles by shutting its workers down) once the server is gone.

When the server shuts the engine down it first sends SIGTERM to the engine's whole group
(:func:`stop_engine_groups`), as the terminal would have: vLLM's model worker only exits
promptly on a signal of its own, and otherwise is killed after vLLM's 5 s grace.

vLLM names the engine core's entry point ``EngineCoreProc.run_engine_core`` when it builds the
process; :func:`engine_core_in_own_group` swaps in :func:`run_in_own_group` for that moment.
The function is pickled by reference, so it also works with the ``spawn`` start method.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from server.vllm_idle import workers_park_when_idle

log = logging.getLogger(__name__)

PARENT_POLL_S = 1.0

_original: Callable[..., Any] | None = None  # vLLM's entry point, set while the swap is in place


def watch_parent(poll_s: float = PARENT_POLL_S) -> threading.Thread:
    """SIGTERM this process once its parent is gone (it is then re-parented)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        log.warning("the Lamina server (pid %d) is gone; stopping the engine", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread


def leave_process_group() -> None:
    """Become the leader of a new process group (same session, same terminal)."""
    os.setpgid(0, 0)


def run_in_own_group(*args: Any, **kwargs: Any) -> Any:
    """The engine core's entry point, first moved into its own process group. Its workers are
    started after this and inherit the group; they also stop spinning a CPU core 50 ms after
    their last message rather than a second after (server/vllm_idle.py)."""
    leave_process_group()
    watch_parent()
    workers_park_when_idle()  # see server/vllm_idle.py
    target = _original
    if target is None:  # started with ``spawn``: vLLM in this process was never patched
        from vllm.v1.engine.core import EngineCoreProc

        target = EngineCoreProc.run_engine_core
    return target(*args, **kwargs)


@contextlib.contextmanager
def engine_core_in_own_group() -> Iterator[None]:
    """While this is entered, vLLM starts its engine core through :func:`run_in_own_group`."""
    global _original
    from vllm.v1.engine.core import EngineCoreProc

    original = EngineCoreProc.__dict__["run_engine_core"]  # the staticmethod object
    _original = original.__func__
    EngineCoreProc.run_engine_core = staticmethod(run_in_own_group)  # type: ignore[method-assign]
    try:
        yield
    finally:
        EngineCoreProc.run_engine_core = original  # type: ignore[method-assign]
        _original = None


def stop_engine_groups(sig: signal.Signals = signal.SIGTERM) -> list[int]:
    """Send ``sig`` to the process group of each engine core this process started (the child
    processes that lead a group of their own); returns those groups."""
    ours = os.getpgrp()
    groups = []
    for child in multiprocessing.active_children():
        pid = child.pid
        if pid is None:
            continue
        try:
            if os.getpgid(pid) == pid != ours:
                os.killpg(pid, sig)
                groups.append(pid)
        except ProcessLookupError:  # exited meanwhile
            continue
    return groups
