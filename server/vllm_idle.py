"""vLLM's model worker stops spinning on the CPU 50 ms after its last message, not after a second.

The engine core hands work to its model worker over a shared-memory queue. While it waits for
the next message the worker busy-waits (``sched_yield`` in a loop) for ``busy_loop_s`` after
the last one, 1 s in vLLM, and only then parks on a socket until notified
(``shm_broadcast.SpinCondition``). The spin saves a wake-up between the steps of a running
generation, which come milliseconds apart; after anything else (an adapter load, an unload,
the last step of a request) it holds a core for a whole second doing nothing.

That second is what one replica of two on a host waited after each publish: on the CPU vLLM
pins each engine's worker to the first core of the machine, the same core for every engine
on the host, so the replica that loaded the new version first kept that core spinning and the
other replica's worker ran its ``add_lora`` only once the spin ended (measured: 1.0-1.1 s
after the publish, against 0.01-0.1 s for the first). A 50 ms spin keeps vLLM's fast path for
consecutive steps and bounds that wait.

vLLM starts its worker with ``WorkerProc.worker_main`` from the engine core process;
:func:`workers_park_when_idle` (called there, by ``server.engine_process``) swaps in
:func:`run_worker`, which shortens the spin in the worker before vLLM builds its queues. The
function is pickled by reference, so this works with the ``spawn`` start method vLLM uses on
the CPU, and with ``fork``.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

IDLE_SPIN_S = 0.05  # vLLM's default is 1.0

_original: Callable[..., Any] | None = None  # vLLM's worker entry point, once swapped


def park_idle_readers(spin_s: float = IDLE_SPIN_S) -> None:
    """Every shared-memory queue reader created in this process from now on busy-waits at most
    ``spin_s`` after its last read before it parks (idempotent)."""
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    init = SpinCondition.__init__
    if getattr(init, "lamina_spin_s", None) is not None:
        return

    @functools.wraps(init)
    def shortened(self: SpinCondition, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if self.is_reader:
            self.busy_loop_s = min(self.busy_loop_s, spin_s)

    shortened.lamina_spin_s = spin_s  # type: ignore[attr-defined]
    SpinCondition.__init__ = shortened  # type: ignore[method-assign]


def run_worker(*args: Any, **kwargs: Any) -> Any:
    """The model worker's entry point: vLLM's, with :func:`park_idle_readers` first."""
    park_idle_readers()
    target = _original
    if target is None:  # spawned: vLLM in this process was never patched
        from vllm.v1.executor.multiproc_executor import WorkerProc

        target = WorkerProc.worker_main
    return target(*args, **kwargs)


def workers_park_when_idle() -> None:
    """Start every model worker this process starts through :func:`run_worker` (for the rest
    of the process's life: call it in the engine core process, which only runs the engine).

    Only where vLLM is already loaded, as it always is in an engine core (its entry point and
    arguments are vLLM's): a process without it starts no vLLM workers, and importing vLLM
    only to patch it would cost seconds."""
    global _original
    if "vllm" not in sys.modules or _original is not None:
        return
    from vllm.v1.executor.multiproc_executor import WorkerProc

    _original = WorkerProc.__dict__["worker_main"].__func__
    WorkerProc.worker_main = staticmethod(run_worker)  # type: ignore[method-assign]
