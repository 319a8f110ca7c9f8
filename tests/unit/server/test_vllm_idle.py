"""vLLM's model worker parks 50 ms after its last message (server/vllm_idle.py): a real
shared-memory queue reader, waiting idle, burns a small part of a core instead of all of it,
and the engine core starts its workers through the entry point that sets this up."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from server import vllm_idle

IDLE_WAIT_S = 0.5


@pytest.fixture
def vllm_as_shipped() -> Iterator[None]:
    """Undo the swaps after each test, so no other test runs a patched vLLM."""
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
    from vllm.v1.executor.multiproc_executor import WorkerProc

    init, entry = SpinCondition.__init__, WorkerProc.__dict__["worker_main"]
    yield
    SpinCondition.__init__ = init  # type: ignore[method-assign]
    WorkerProc.worker_main = entry  # type: ignore[method-assign]
    vllm_idle._original = None


def idle_reader_cpu_s() -> tuple[float, float]:
    """A reader of a real vLLM message queue takes one message, then waits ``IDLE_WAIT_S`` for
    a next one that never comes: (CPU seconds it used while waiting, its spin window)."""
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue

    writer = MessageQueue(1, 1, max_chunk_bytes=1 << 16, max_chunks=2)
    handle = writer.export_handle()
    measured: dict[str, Any] = {}

    def read() -> None:
        reader = MessageQueue.create_from_handle(handle, 0)
        reader.wait_until_ready()
        measured["message"] = reader.dequeue()
        start = time.thread_time()
        with pytest.raises(TimeoutError):
            reader.dequeue(timeout=IDLE_WAIT_S)
        measured["cpu_s"] = time.thread_time() - start
        measured["spin_s"] = reader._spin_condition.busy_loop_s

    thread = threading.Thread(target=read)
    thread.start()
    writer.wait_until_ready()
    writer.enqueue("work")
    thread.join(timeout=30)
    del writer  # its shared memory is unlinked when it is collected
    gc.collect()
    assert measured["message"] == "work"
    return measured["cpu_s"], measured["spin_s"]


def test_an_idle_reader_parks_after_the_short_spin(vllm_as_shipped: None) -> None:
    vllm_idle.park_idle_readers()
    cpu_s, spin_s = idle_reader_cpu_s()
    assert spin_s == vllm_idle.IDLE_SPIN_S
    # vLLM's own reader spins through the whole wait (~0.45 s of CPU here); ours parks after 50 ms
    assert cpu_s < 0.2, f"the idle reader used {cpu_s:.3f} s of CPU in {IDLE_WAIT_S} s"


def test_the_engine_core_starts_its_workers_through_run_worker(vllm_as_shipped: None) -> None:
    from vllm.v1.executor.multiproc_executor import WorkerProc

    vllm_entry = WorkerProc.worker_main
    vllm_idle.workers_park_when_idle()
    vllm_idle.workers_park_when_idle()  # twice: still vLLM's entry underneath, not our own
    assert WorkerProc.worker_main is vllm_idle.run_worker
    assert vllm_idle._original is vllm_entry


def test_run_worker_shortens_the_spin_then_runs_the_worker(vllm_as_shipped: None) -> None:
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    seen: list[tuple[tuple, dict, float | None]] = []

    def worker_main(*args: Any, **kwargs: Any) -> str:
        seen.append((args, kwargs, getattr(SpinCondition.__init__, "lamina_spin_s", None)))
        return "ran"

    vllm_idle._original = worker_main
    assert vllm_idle.run_worker(1, rank=0) == "ran"
    assert seen == [((1,), {"rank": 0}, vllm_idle.IDLE_SPIN_S)]
