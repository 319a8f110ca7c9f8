"""Faults, with real processes: a worker SIGKILLed mid-training, Redis restarted while a job
runs, 20 tasks posted at once, a worker stalled (SIGSTOP) past its lease right before it
publishes, a version damaged on disk before the server loads it, and the server restarted.

The stack has its own ``redis-server`` (no persistence, so a restart loses every queued
message: the hardest case), a ``lamina worker`` and the server. Jobs hold a short lease
(LAMINA_JOB_LEASE_S) so a dead worker's job is noticed in seconds. The tests run in file
order and build on each other's tasks; the server restart comes last.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from adapters_store import ledger as ledger_module
from adapters_store.store import AdapterStore
from tests.support import service_stack
from tests.support.backend import MULTI_HOST
from tests.support.processes import RedisServer, start_server, stop_server
from tests.support.service_stack import (
    Stack,
    answers,
    get_job,
    running_stack,
    served_models,
    start_worker,
    stop_worker,
    wait_for,
    wait_until_served,
)

pytestmark = [pytest.mark.engine, pytest.mark.integration]

METHOD = "lori-d"
LEASE_S = 5
SHORT = {"steps": 8, "learning_rate": 0.005, "batch_size": 4, "r": 2, "seed": 0}
LONG = {**SHORT, "steps": 1_000_000}  # never finishes on its own
MEDIUM = {**SHORT, "steps": 100}  # runs long enough to restart Redis under it
EXAMPLES = [(f"Word {i} means", f" {w}") for i, w in enumerate(["sun", "moon", "star", "sky"])]
BURST = 20
ADMIN = {"Authorization": "Bearer faults-admin-key"}


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, private_redis: RedisServer) -> Iterator[Stack]:
    settings = {
        "LAMINA_DEFAULT_METHOD": METHOD,
        "LAMINA_JOB_LEASE_S": str(LEASE_S),
        "LAMINA_ADMIN_KEY": ADMIN["Authorization"].removeprefix("Bearer "),
        # these tests are about crashes and order over ~30 tasks, not what a task keeps: the check
        # before each publish (one evaluation per live task) would cost them minutes for nothing
        "LAMINA_FORGETTING_POLICY": "off",
    }
    with running_stack(
        tmp_path_factory.mktemp("lamina-home"), settings, private_redis.url, queue="lamina-faults"
    ) as stack:
        yield stack


def post(stack: Stack, name: str, hyperparameters: dict) -> str:
    response = service_stack.post_task(stack, name, EXAMPLES, METHOD, hyperparameters)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def wait_until_training(stack: Stack, job_id: str) -> None:
    """Until the job has taken at least one optimizer step."""
    deadline = time.monotonic() + service_stack.JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        job = get_job(stack, job_id)
        assert job["status"] not in service_stack.TERMINAL, job
        if job["status"] == "running" and (job["progress"] or {}).get("step", 0) >= 1:
            return
        time.sleep(0.2)
    pytest.fail(f"job {job_id} never started training")


def published_tasks(stack: Stack) -> list[str]:
    """Task names in the order the store's ledger says they were published."""
    return [entry["task"] for entry in stack.ledger() if entry["op"] == "add_task"]


def live_merge(stack: Stack) -> str | None:
    return httpx.get(f"{stack.url}/ready").json()["live_merge"]


def kill_worker(worker: subprocess.Popen) -> None:
    """SIGKILL the worker's whole process group: no handler runs, nothing is cleaned up."""
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(timeout=10)


def test_a_worker_killed_mid_training_loses_nothing_and_the_queue_moves_on(stack: Stack) -> None:
    keep = wait_for(stack, post(stack, "keep", SHORT))
    assert keep["status"] == "succeeded", keep
    wait_until_served(stack, keep["merge_id"])
    before = (live_merge(stack), answers(stack, "continual", EXAMPLES))

    doomed = post(stack, "doomed", LONG)
    wait_until_training(stack, doomed)
    kill_worker(stack.worker)
    following = post(stack, "after-kill", SHORT)
    time.sleep(LEASE_S + 1)  # the dead worker's lease lapses; nothing may have changed meanwhile

    assert (live_merge(stack), answers(stack, "continual", EXAMPLES)) == before
    assert "doomed" not in served_models(stack)
    assert "doomed" not in published_tasks(stack)
    assert not list((stack.home / "store" / "tasks").glob("doomed*")), "a partial version is visible"
    failed = get_job(stack, doomed)  # no worker is alive: the API itself reports the lapse
    assert failed["status"] == "failed" and failed["error"]["code"] == "worker_lost", failed
    assert get_job(stack, following)["status"] == "queued"

    stack.worker = start_worker(stack.env, stack.home / "worker.log")
    after = wait_for(stack, following)
    assert after["status"] == "succeeded", after
    wait_until_served(stack, after["merge_id"])
    assert published_tasks(stack) == ["keep", "after-kill"]
    assert {"keep", "after-kill", "continual"} <= served_models(stack)


def test_a_redis_restart_while_a_job_runs_loses_and_repeats_nothing(
    stack: Stack, private_redis: RedisServer
) -> None:
    running = post(stack, "through-restart", MEDIUM)
    waiting = post(stack, "behind-restart", SHORT)  # its queue message dies with Redis
    wait_until_training(stack, running)
    private_redis.restart()

    finished = [wait_for(stack, job_id) for job_id in (running, waiting)]
    assert [job["status"] for job in finished] == ["succeeded", "succeeded"], finished
    assert published_tasks(stack)[-2:] == ["through-restart", "behind-restart"]
    assert published_tasks(stack).count("through-restart") == 1
    wait_until_served(stack, finished[-1]["merge_id"])
    assert {"through-restart", "behind-restart"} <= served_models(stack)


def test_twenty_concurrent_tasks_all_train_in_arrival_order(stack: Stack) -> None:
    names = [f"burst-{i:02d}" for i in range(BURST)]
    with ThreadPoolExecutor(max_workers=BURST) as pool:
        job_ids = list(pool.map(lambda name: post(stack, name, SHORT), names))

    jobs = [wait_for(stack, job_id, timeout_s=600) for job_id in job_ids]
    assert [job["status"] for job in jobs] == ["succeeded"] * BURST
    arrival = [job["name"] for job in sorted(jobs, key=lambda job: job["seq"])]
    assert [name for name in published_tasks(stack) if name.startswith("burst-")] == arrival
    wait_until_served(stack, max(jobs, key=lambda job: job["seq"])["merge_id"])
    assert set(names) <= served_models(stack)


def waits_for_lock(worker: subprocess.Popen, lock_file: Path) -> bool:
    """Whether a process of ``worker`` is blocked in ``flock`` on ``lock_file`` (a ``->`` line of
    /proc/locks; matched by inode, since overlay filesystems may report another device)."""
    family = {worker.pid, *(child.pid for child in psutil.Process(worker.pid).children(recursive=True))}
    inode = str(os.stat(lock_file).st_ino)
    waiting = [line.split() for line in Path("/proc/locks").read_text().splitlines() if " -> FLOCK " in line]
    return any(int(f[5]) in family and f[6].rsplit(":", 1)[-1] == inode for f in waiting if len(f) > 6)


def stop_all(worker: subprocess.Popen) -> None:
    """SIGSTOP the worker's process group and wait until every thread of it has stopped: a
    thread that is woken (by a lock release) before it handles the signal would run on."""
    os.killpg(worker.pid, signal.SIGSTOP)
    family = [worker.pid, *(child.pid for child in psutil.Process(worker.pid).children(recursive=True))]
    deadline = time.monotonic() + 30
    while not all(
        (task / "stat").read_text().rsplit(")", 1)[1].split()[0] in "tT"
        for pid in family
        for task in Path(f"/proc/{pid}/task").iterdir()
    ):
        assert time.monotonic() < deadline, "the worker did not stop"
        time.sleep(0.05)


def wait_for_log(path: Path, text: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        time.sleep(0.5)
    pytest.fail(f"{path.name} never said {text!r}; its tail:\n{path.read_text(errors='replace')[-3000:]}")


@pytest.mark.skipif(
    MULTI_HOST,
    reason="holds the store's flock; with the database the fence is tested in tests/unit/trainer/test_fence.py",
)
def test_a_worker_stalled_past_its_lease_right_before_publishing_publishes_nothing(stack: Stack) -> None:
    store_dir = stack.home / "store"
    with (store_dir / ".lock").open("a") as held:  # the store's writer lock, as a slow writer holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        stalled = post(stack, "stalled", SHORT)
        deadline = time.monotonic() + service_stack.JOB_TIMEOUT_S
        while not waits_for_lock(stack.worker, store_dir / ".lock"):  # trained; now publishing
            assert time.monotonic() < deadline, get_job(stack, stalled)
            time.sleep(0.2)
        stop_all(stack.worker)  # it stalls right there, heartbeat and all
        fcntl.flock(held, fcntl.LOCK_UN)
    stopped = stack.worker
    try:
        lost = wait_for(stack, stalled)
        assert lost["status"] == "failed" and lost["error"]["code"] == "worker_lost", lost
        stack.worker = start_worker(stack.env, stack.home / "worker-2.log")
        following = wait_for(stack, post(stack, "after-stall", SHORT), timeout_s=300)
        assert following["status"] == "succeeded", following
        wait_until_served(stack, following["merge_id"])
        ledger_before = stack.ledger()

        os.killpg(stopped.pid, signal.SIGCONT)  # wakes up inside its publish
        wait_for_log(stack.home / "worker.log", "the store refused it")
    finally:
        os.killpg(stopped.pid, signal.SIGCONT)
        stop_worker(stopped)

    assert stack.ledger() == ledger_before, "the stalled worker wrote to the ledger"
    assert published_tasks(stack)[-1] == "after-stall" and "stalled" not in published_tasks(stack)
    assert not list((store_dir / "tasks").glob("stalled/v*")), "the stalled worker left a version"
    assert live_merge(stack) == following["merge_id"] == stack.ledger()[-1]["merge"]
    assert get_job(stack, stalled)["error"]["code"] == "worker_lost"
    assert "stalled" not in served_models(stack) and "after-stall" in served_models(stack)


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.skipif(
    MULTI_HOST,
    reason="a host's damaged copy of a version in a bucket is fetched again, by design "
    "(tests/unit/adapters_store/test_store_object_storage.py)",
)
def test_a_version_damaged_on_disk_never_goes_live(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    before = (live_merge(stack), served_models(stack), answers(stack, "continual", EXAMPLES))
    store_dir = stack.home / "store"
    store = AdapterStore(store_dir, json.loads((store_dir / "store.json").read_text())["fingerprint"])
    live = store.live()
    assert live is not None and live.id == before[0]

    real_append = ledger_module.Ledger.append

    def damage_then_append(
        ledger: ledger_module.Ledger, entries: list[dict], guard: Any = None
    ) -> list[dict]:
        """The disk changes one bit of the new version after it was written, before it is read."""
        add = next(e for e in entries if e["op"] == "add_task")
        flip_last_byte(store_dir / "tasks" / add["task"] / f"v{add['version']}" / "adapter_model.safetensors")
        return real_append(ledger, entries, guard)

    monkeypatch.setattr(ledger_module.Ledger, "append", damage_then_append)
    store.publish("damaged", store.task_adapter(store.tasks()[0].name), {"method": METHOD}, live.method)
    monkeypatch.undo()

    deadline = time.monotonic() + 60
    while "damaged/v1" not in str(
        served := httpx.get(f"{stack.url}/admin/adapters", headers=ADMIN).json()["served"]
    ):
        assert time.monotonic() < deadline, served
        time.sleep(0.3)
    assert "CorruptVersion" in served["last_error"] and "adapter_model.safetensors" in served["last_error"]
    assert (live_merge(stack), served_models(stack), answers(stack, "continual", EXAMPLES)) == before
    assert "refusing task damaged/v1" in (stack.home / "server.log").read_text(errors="replace")
    ready = httpx.get(f"{stack.url}/ready")  # it serves the old model, and says it is behind the store
    assert ready.status_code == 503 and ready.json()["status"] == "out_of_sync", ready.text
    assert "CorruptVersion" in ready.json()["detail"] and ready.json()["live_merge"] == before[0]

    back = httpx.post(f"{stack.url}/admin/rollback", json={"merge_id": before[0]}, headers=ADMIN, timeout=60)
    assert back.status_code == 200, back.text
    assert httpx.get(f"{stack.url}/admin/adapters", headers=ADMIN).json()["served"]["last_error"] is None
    assert store.live() == live
    assert httpx.get(f"{stack.url}/ready").status_code == 200


def test_a_restarted_server_serves_the_same_models_and_answers(stack: Stack) -> None:
    models = ["base", "continual", "keep", "after-kill", "behind-restart"]
    before = (live_merge(stack), served_models(stack), [answers(stack, m, EXAMPLES) for m in models])
    assert stop_server(stack.server) == []

    stack.server = start_server(stack.env, stack.home / "server-restarted.log")
    after = (live_merge(stack), served_models(stack), [answers(stack, m, EXAMPLES) for m in models])
    assert after == before
