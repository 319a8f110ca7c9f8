"""Replicas converge across hosts: two ``lamina serve`` replicas and two ``lamina worker``
processes with no shared directory, as a deployment over several machines runs them. Each has a
home of its own; they share only PostgreSQL (the ledger and the job board, through a proxy the
test can cut), an S3-compatible bucket (moto's server, the versions' files) and Redis.

- tasks posted to either replica train once each, in arrival order;
- both replicas serve each new live version on its Redis event within the issue's 1 s, long
  before their ledger poll would have found it, and within the poll interval when no event
  comes (a replica without Redis, or an event lost while Redis was away: both look the same
  to the replica);
- a rollback on one replica reaches the other;
- streams on ``continual`` on both replicas keep one version each while versions are
  published and rolled back under them (the small CI version of ``bench/streams``);
- a worker killed mid-training fails its job ``worker_lost`` and the other worker trains on;
- the database going away mid-job (every connection cut, new ones refused for a few seconds, as
  in a restart) loses nothing: the job finishes and is published once.

The one-host layout (one store directory, files only) is what the fault and service tests run.

The replicas poll the ledger every ``POLL_S`` seconds, far longer than ``EVENT_FOLLOW_S``, so
a replica that only followed the poll would miss that bound (for 8 replica-publishes, by chance
alone, with odds below 1e-7). A thread watches both replicas' ``/ready`` for the whole module
and records when each started serving which merge; latencies are measured from the ``ts`` of
the ledger's ``set_live`` entry. The tests run in file order and build on each other's
versions.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from adapters_store.blobs import ObjectStorage
from adapters_store.events import redis_notifier
from adapters_store.fingerprint import fingerprint_model
from adapters_store.ledger_database import DatabaseLedger
from adapters_store.store import AdapterStore
from bench import serving_common as common
from bench.object_storage import S3Server
from bench.serve.client import RequestResult, completion_body, loop_until
from tests.support.processes import RunningServer, start_server, stop_server
from tests.support.service_stack import (
    REDIS_URL,
    Stack,
    get_job,
    post_task,
    require_redis,
    start_worker,
    stop_together,
    stop_worker,
    wait_for,
)
from tests.support.tcp_proxy import CuttableProxy

pytestmark = [pytest.mark.engine, pytest.mark.integration]

METHOD = "lori-d"
SHORT = {"steps": 8, "learning_rate": 0.005, "batch_size": 4, "r": 2, "seed": 0}
EXAMPLES = [(f"Word {i} means", f" {w}") for i, w in enumerate(["sun", "moon", "star", "sky"])]
POLL_S = 10.0  # each replica's ledger poll (LAMINA_LEDGER_POLL_S)
# A replica following the Redis event: the 1 s, plus 0.2 s for this test's sampling (both
# replicas' /ready in turn every 50 ms, each answer slower on a loaded 2-core machine). Measured
# 0.02-0.19 s per replica; it was 1.05-1.10 s for one replica of the two while vLLM's workers,
# pinned to one core, spun on it for a second after each message (server/vllm_idle.py).
EVENT_FOLLOW_S = 1.2
SYNC_SLACK_S = 1.5  # loading a version and this test's 50 ms /ready sampling, on a loaded 2-core machine
ADMIN_KEY = "replicas-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
STREAM_CLIENTS = 8  # split over the two replicas
STREAM_MAX_TOKENS = 24
LEASE_S = 12  # a killed worker's job is noticed this soon; longer than the database cut below
DATABASE_CUT_S = 3


class LiveWatch:
    """Samples each replica's ``/ready`` every 50 ms and records ``(time.time(), live_merge)``
    whenever the merge it serves changes."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.timelines: list[list[tuple[float, str | None]]] = [[] for _ in urls]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.wait(0.05):
                for url, timeline in zip(self.urls, self.timelines, strict=True):
                    try:
                        merge = client.get(f"{url}/ready").json().get("live_merge")
                    except (httpx.HTTPError, ValueError):
                        continue
                    if not timeline or timeline[-1][1] != merge:
                        timeline.append((time.time(), merge))

    def serving_delay(self, replica: int, merge: str, published: float, later: set[str]) -> float | None:
        """Seconds from ``published`` until ``replica`` served ``merge`` (or a version made live
        after it, in ``later``: a replica may skip one that was replaced before it looked)."""
        for when, served in self.timelines[replica]:
            if when >= published - 0.01 and (served == merge or served in later):
                return max(0.0, when - published)
        return None


@dataclass
class Replicas:
    servers: list[RunningServer]
    workers: list[subprocess.Popen]
    home: Path
    store: str  # the bucket prefix every process names as LAMINA_STORE
    database_url: str  # through ``proxy``
    s3: S3Server
    proxy: CuttableProxy
    watch: LiveWatch
    env: dict[str, str]
    worker_logs: list[Path] = field(default_factory=list)

    def stack(self, replica: int) -> Stack:
        """A ``service_stack.Stack`` view of one replica, for the shared job helpers."""
        return Stack(self.servers[replica], self.workers[replica], {}, self.home)

    def ledger(self) -> list[dict]:
        return DatabaseLedger(self.database_url, self.store).read()

    def open_store(self, model_dir: Path, root: Path, redis_url: str | None = None) -> AdapterStore:
        """The store as a third host opens it, with a local copy of its own at ``root``."""
        return AdapterStore(
            root,
            fingerprint_model(model_dir),
            base_model=str(model_dir),
            on_event=redis_notifier(redis_url, self.store) if redis_url else None,
            ledger=DatabaseLedger(self.database_url, self.store),
            objects=ObjectStorage(self.store, self.s3.options),
            location=self.store,
        )

    def set_live_entries(self) -> list[dict]:
        return [e for e in self.ledger() if e["op"] == "set_live" and e["merge"]]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, database_url: str, s3: S3Server) -> Iterator[Replicas]:
    require_redis()
    home = tmp_path_factory.mktemp("replicas")
    store = s3.store_url()
    proxy = CuttableProxy("127.0.0.1", 5432)
    through_proxy = database_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    assert through_proxy != database_url, database_url
    shared = {
        "LAMINA_STORE": store,
        "LAMINA_DATABASE_URL": through_proxy,
        "LAMINA_S3_ENDPOINT_URL": s3.endpoint_url,
        "LAMINA_JOB_LEASE_S": str(LEASE_S),
        "LAMINA_BROKER_URL": REDIS_URL,
        "LAMINA_QUEUE": f"lamina-replicas-{uuid.uuid4().hex[:8]}",
        "LAMINA_DEFAULT_METHOD": METHOD,
        "LAMINA_LEDGER_POLL_S": str(POLL_S),
        "LAMINA_ADMIN_KEY": ADMIN_KEY,
        # two engines at once: 5 % of host memory each (~1.2 GiB of KV cache on a 24 GiB machine)
        # is plenty for these few short requests, and leaves room for the rest of the suite
        "LAMINA_KV_CACHE_FRACTION": "0.05",
        # The bound is for following the store: the event plus loading an adapter. Serving
        # continual from the weights (the default) adds its own drain and weight write to every
        # swap, 0.03-1.6 s on a loaded 2-core machine; bench/streams measures both modes.
        "LAMINA_CONTINUAL_SERVING": "lora",
        # What is followed here is the live merge, whose version each continual answer names;
        # routing (tests/integration/test_continual_service.py) would name a task's version instead.
        "LAMINA_CONTINUAL_ROUTING": "off",
        # With routing off every prompt meets the merge, so each task moves the base's answers to
        # general prompts, which the check before a publish refuses by default; what is checked
        # here is forgetting a task (the last test), and following the store.
        "LAMINA_MAX_GENERAL_DROP": "100",
    }
    logs = [home / "worker.log", home / "worker-2.log"]  # the first is where wait_for looks
    workers = [start_worker({**shared, "LAMINA_HOME": str(home / f"w{i}")}, logs[i]) for i in range(2)]
    servers: list[RunningServer] = []
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            starting = [
                pool.submit(
                    start_server, {**shared, "LAMINA_HOME": str(home / f"r{i}")}, home / f"replica-{i}.log"
                )
                for i in range(2)
            ]
            for future in starting:
                servers.append(future.result())
        watch = LiveWatch([s.url for s in servers])
        watch.start()
        replicas = Replicas(servers, workers, home, store, through_proxy, s3, proxy, watch, shared, logs)
        yield replicas
        watch.stop()  # the finally below stops the workers in ``replicas.workers``, replacements included
    finally:
        proxy.close()
        stop_together(
            *(functools.partial(stop_server, server) for server in servers),
            *(functools.partial(stop_worker, worker) for worker in workers),
        )


def fingerprint(server: RunningServer) -> str | None:
    """The version a fresh ``continual`` answer on ``server`` says it came from."""
    body = {"model": "continual", "prompt": EXAMPLES[0][0], "max_tokens": 1, "temperature": 0}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["system_fingerprint"]


def published_at(entry: dict) -> float:
    return datetime.fromisoformat(entry["ts"]).timestamp()


def assert_followed(replicas: Replicas, entries: list[dict], bound_s: float) -> list[list[float]]:
    """Every replica served each ``set_live`` entry's merge within ``bound_s``; returns the
    delays, per entry and replica."""
    all_live = replicas.set_live_entries()
    delays = []
    for entry in entries:
        later = {e["merge"] for e in all_live if e["seq"] > entry["seq"]}
        row = []
        for replica in range(2):
            delay = replicas.watch.serving_delay(replica, entry["merge"], published_at(entry), later)
            assert delay is not None, (
                f"replica {replica} never served {entry['merge']}; seen: {replicas.watch.timelines[replica]}"
            )
            row.append(delay)
        delays.append(row)
    print(f"followed {[e['merge'] for e in entries]} after (s, per replica): {delays}")
    assert max(max(row) for row in delays) <= bound_s, f"{bound_s} s bound missed: {delays}"
    return delays


def wait_both_serve(replicas: Replicas, merge: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(httpx.get(f"{s.url}/ready").json().get("live_merge") == merge for s in replicas.servers):
            return
        time.sleep(0.1)
    pytest.fail(f"the replicas never both served {merge}")


def assert_same_version(replicas: Replicas, merge: str) -> None:
    """Both replicas answer ``continual`` from the engine version of ``merge``."""
    wait_both_serve(replicas, merge)
    assert [fingerprint(s) for s in replicas.servers] == [f"continual@{merge}"] * 2


def rollback(server: RunningServer, merge: str) -> dict:
    """An admin rollback, which answers once this replica serves it. How long that takes is not
    what these tests check (``assert_followed`` bounds the replicas' following): under the streams
    test's 8 streams one took over 30 s once in six runs on 2 cores (cause not found), so the
    client waits up to 120 s rather than failing the streams' check on its own timeout."""
    response = httpx.post(
        f"{server.url}/admin/rollback", json={"merge_id": merge}, headers=ADMIN, timeout=120
    )
    assert response.status_code == 200, response.text
    return response.json()


# --- the tests, in order ------------------------------------------------------------------------


def test_tasks_posted_to_either_replica_train_once_in_arrival_order(replicas: Replicas) -> None:
    names = [f"rep-{i}" for i in range(4)]
    job_ids = []
    for i, name in enumerate(names):  # alternate replicas: A, B, A, B
        response = post_task(replicas.stack(i % 2), name, EXAMPLES, METHOD, SHORT)
        assert response.status_code == 202, response.text
        job_ids.append(response.json()["id"])

    jobs = [wait_for(replicas.stack(0), job_id) for job_id in job_ids]
    assert [job["status"] for job in jobs] == ["succeeded"] * 4, jobs
    assert [job["seq"] for job in jobs] == sorted(job["seq"] for job in jobs)
    assert [e["task"] for e in replicas.ledger() if e["op"] == "add_task"] == names  # once each, in order
    # both replicas read one job board
    assert [get_job(replicas.stack(1), job_id)["status"] for job_id in job_ids] == ["succeeded"] * 4
    claims = "".join(log.read_text(errors="replace") for log in replicas.worker_logs)
    assert [claims.count(f"claimed {job_id} ") for job_id in job_ids] == [1] * 4, "a job trained twice"
    assert_same_version(replicas, jobs[-1]["merge_id"])


def test_both_replicas_serve_every_publish_on_its_event_before_any_poll(replicas: Replicas) -> None:
    published = [e for e in replicas.set_live_entries() if e["cause"] == "add_task"]
    assert len(published) == 4
    assert_followed(replicas, published, EVENT_FOLLOW_S)


def test_a_rollback_on_one_replica_reaches_the_other_on_its_event(replicas: Replicas) -> None:
    entries = replicas.set_live_entries()
    first, last = entries[0]["merge"], entries[-1]["merge"]
    rollback(replicas.servers[0], first)
    assert_same_version(replicas, first)
    rollback(replicas.servers[1], last)
    assert_same_version(replicas, last)
    entries = [e for e in replicas.set_live_entries() if e["cause"] == "rollback"]
    assert [e["merge"] for e in entries] == [first, last]
    assert_followed(replicas, entries, EVENT_FOLLOW_S)


def test_without_an_event_both_replicas_follow_the_ledger_within_the_poll_interval(
    replicas: Replicas, base_model_dir: Path
) -> None:
    entries = replicas.set_live_entries()
    target = entries[-2]["merge"]  # the version before the live one
    # A writer with no Redis (on_event=None): only the replicas' ledger polls can notice.
    replicas.open_store(base_model_dir, replicas.home / "third-host").rollback(target)
    assert_same_version(replicas, target)
    entry = replicas.set_live_entries()[-1]
    assert entry["merge"] == target
    assert_followed(replicas, [entry], POLL_S + SYNC_SLACK_S)


def test_streams_on_both_replicas_keep_one_version_across_publishes_and_a_rollback(
    replicas: Replicas, base_model_dir: Path
) -> None:
    """8 streaming clients (4 per replica) on ``continual`` while 2 versions are published (by a
    writer that announces them on Redis, as a worker does) and one is rolled back: no request
    fails and none mixes versions, and streams were in flight across every change."""
    store = replicas.open_store(base_model_dir, replicas.home / "third-host", REDIS_URL)
    shapes = common.target_shapes(base_model_dir)
    results: list[RequestResult] = []
    changes: list[float] = []  # time.perf_counter() of each change, as the client records times

    def body(i: int) -> dict:
        return completion_body("continual", EXAMPLES[i % len(EXAMPLES)][0], STREAM_MAX_TOKENS, seed=i)

    async def run() -> None:
        stop = asyncio.Event()
        # pooled connections expire before uvicorn's 5 s keep-alive does, so no request goes out on a
        # connection the server is closing (a ReadError that has nothing to do with swaps)
        limits = httpx.Limits(max_connections=STREAM_CLIENTS + 4, keepalive_expiry=2.0)
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(120.0, connect=10.0)) as client:
            loops = [
                asyncio.create_task(loop_until(client, replicas.servers[i % 2].url, body, stop, results))
                for i in range(STREAM_CLIENTS)
            ]
            await asyncio.sleep(2.0)
            for seed in (1, 2):
                changes.append(time.perf_counter())
                await asyncio.to_thread(
                    common.publish_random, store, f"stream-{seed}", shapes, 2, seed, METHOD, "concat"
                )
                await asyncio.sleep(2.0)
            changes.append(time.perf_counter())
            await asyncio.to_thread(rollback, replicas.servers[0], replicas.set_live_entries()[-2]["merge"])
            await asyncio.sleep(2.0)
            stop.set()
            await asyncio.gather(*loops)

    asyncio.run(run())
    failed = [r.error for r in results if not r.ok]
    assert failed == [], failed[:5]
    assert [r.fingerprints for r in results if r.mixed] == []
    live = replicas.set_live_entries()
    versions = {f"continual@{e['merge']}" for e in live[-3:]}
    assert versions <= {r.fingerprint for r in results}, "a change was never served to a stream"
    for when in changes:  # the swaps happened under streams, not between them
        assert any(r.sent < when < r.done for r in results), f"no stream in flight at {when}"
    assert_same_version(replicas, live[-1]["merge"])


def _training(replicas: Replicas, job_id: str) -> None:
    """Until the job has taken an optimizer step."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = get_job(replicas.stack(0), job_id)
        assert job["status"] not in ("succeeded", "failed", "cancelled"), job
        if job["status"] == "running" and (job["progress"] or {}).get("step", 0) >= 1:
            return
        time.sleep(0.2)
    pytest.fail(f"job {job_id} never started training")


def test_a_worker_killed_mid_training_fails_its_job_and_the_other_worker_trains_on(
    replicas: Replicas,
) -> None:
    before = replicas.ledger()
    doomed = post_task(replicas.stack(0), "doomed", EXAMPLES, METHOD, {**SHORT, "steps": 1_000_000}).json()[
        "id"
    ]
    _training(replicas, doomed)
    which = next(i for i, log in enumerate(replicas.worker_logs) if f"claimed {doomed} " in log.read_text())
    os.killpg(replicas.workers[which].pid, signal.SIGKILL)  # no handler runs, nothing is cleaned up
    replicas.workers[which].wait(timeout=10)
    following = post_task(replicas.stack(1), "after-kill", EXAMPLES, METHOD, SHORT).json()["id"]

    after = wait_for(replicas.stack(1), following)
    assert after["status"] == "succeeded", after
    failed = get_job(replicas.stack(0), doomed)
    assert failed["status"] == "failed" and failed["error"]["code"] == "worker_lost", failed
    added = [e["task"] for e in replicas.ledger()[len(before) :] if e["op"] == "add_task"]
    assert added == ["after-kill"], added
    assert_same_version(replicas, after["merge_id"])
    remove(replicas, "after-kill")  # the last test needs the live tasks it was written against
    replicas.workers[which] = start_worker(
        {**replicas.env, "LAMINA_HOME": str(replicas.home / f"w{which}-again")},
        replicas.home / "worker-3.log",
    )


def test_the_database_going_away_mid_job_loses_nothing(replicas: Replicas) -> None:
    """Every connection to PostgreSQL cut and new ones refused for DATABASE_CUT_S while a job
    trains (what a restart looks like from the processes): the worker rides it out within its
    lease, the job is published once, and both replicas serve it."""
    before = replicas.ledger()
    job_id = post_task(
        replicas.stack(0), "through-cut", EXAMPLES, METHOD, {**SHORT, "steps": 60, "learning_rate": 1e-5}
    ).json()["id"]
    _training(replicas, job_id)
    replicas.proxy.cut(DATABASE_CUT_S)
    time.sleep(DATABASE_CUT_S / 2)
    during = httpx.get(f"{replicas.servers[0].url}/tasks/{job_id}", timeout=10)
    assert during.status_code == 503 and "database" in during.json()["error"]["message"], during.text
    time.sleep(DATABASE_CUT_S / 2 + 0.5)

    job = wait_for(replicas.stack(0), job_id)
    assert job["status"] == "succeeded", job
    added = [e["task"] for e in replicas.ledger()[len(before) :] if e["op"] == "add_task"]
    assert added == ["through-cut"], added
    assert_same_version(replicas, job["merge_id"])
    remove(replicas, "through-cut")


def remove(replicas: Replicas, name: str) -> None:
    response = httpx.delete(f"{replicas.servers[0].url}/admin/tasks/{name}", headers=ADMIN, timeout=60)
    assert response.status_code == 200, response.text


def test_a_task_that_would_overwrite_an_earlier_one_is_refused_and_the_earlier_answers_stay(
    replicas: Replicas,
) -> None:
    """The check before every publish, through the real workers and both replicas: the same
    prompts taught other answers, by a method whose merge is a sum (lori-d) served for every
    prompt (routing off), would overwrite the earlier task; the job fails `would_forget` with
    the per-task numbers, and both replicas keep serving what they served."""
    learn = {"steps": 40, "batch_size": 4, "r": 4, "learning_rate": 0.02, "seed": 0}
    codes = [(f"Code {i} stands for", f" {w}") for i, w in enumerate(["alpha", "bravo", "delta", "kilo"])]
    stack = replicas.stack(0)
    first = wait_for(stack, post_task(stack, "codes", codes, METHOD, learn).json()["id"])
    assert first["status"] == "succeeded", first["error"]
    assert_same_version(replicas, first["merge_id"])
    before = [answers_on(server, codes) for server in replicas.servers]
    assert before[0] == [c for _, c in codes], "the earlier task was not learned: nothing to forget"

    swapped = [(prompt, " zulu") for prompt, _ in codes]
    refused = wait_for(stack, post_task(replicas.stack(1), "recodes", swapped, METHOD, learn).json()["id"])
    assert refused["status"] == "failed" and refused["error"]["code"] == "would_forget", refused
    assert "codes 100 % ->" in refused["error"]["message"]
    assert refused["metrics"]["forgetting"]["codes"] > 2
    assert [e["task"] for e in replicas.ledger() if e["op"] == "add_task"][-1] == "codes"
    assert_same_version(replicas, first["merge_id"])
    assert [answers_on(server, codes) for server in replicas.servers] == before
    stats = httpx.get(f"{replicas.servers[1].url}/admin/stats", headers=ADMIN, timeout=60).json()
    assert stats["accuracy_matrix"][-1]["after"] == "codes/v1"


def answers_on(server: RunningServer, examples: list[tuple[str, str]]) -> list[str]:
    """``continual``'s greedy answers, each cut to the length of the expected one."""
    out = []
    for prompt, expected in examples:
        body = {"model": "continual", "prompt": prompt, "max_tokens": 4, "temperature": 0}
        text = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).json()["choices"][0]["text"]
        out.append(text[: len(expected)])
    return out
