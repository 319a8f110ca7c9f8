"""The training service behind ``POST /tasks`` (server/training/service.py) on a real store, a
real job board and the real Redis at 127.0.0.1:6379 as its queue: an accepted task is one job
on the board and one message naming it on the queue; every refusal is the HTTP error users see
and leaves neither; jobs are read, listed (lapsed claims failed) and cancelled through it.
(When the queue cannot be reached at all: test_queue_unavailable.py.)"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from adapters_store.store import AdapterStore
from server.errors import APIError
from server.settings import ServerSettings
from server.training.protocol import TaskCreate
from server.training.service import TrainingService
from trainer.contract.jobs import JobStatus
from trainer.contract.queue import TRAIN_TASK

REDIS_URL = "redis://127.0.0.1:6379/0"
MAX_EXAMPLES = 3
EXAMPLE = {"prompt": "Sky:", "completion": " blue"}

Build = Callable[..., TrainingService]


def task(**fields: Any) -> TaskCreate:
    return TaskCreate.model_validate({"name": "colours", "examples": [EXAMPLE], **fields})


@pytest.fixture
def queue() -> Iterator[str]:
    """A queue of this test's own on the real Redis, removed afterwards."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError:
        pytest.fail(f"Redis is required at {REDIS_URL}")
    name = f"lamina-unit-{uuid.uuid4().hex[:8]}"
    yield name
    client.delete(name, *client.keys(f"_kombu.binding*.{name}"))


@pytest.fixture
def build(base_model_dir: Path, tmp_path: Path, queue: str) -> Build:
    def service(**settings: Any) -> TrainingService:
        config = ServerSettings(
            model=base_model_dir, home=tmp_path, broker_url=REDIS_URL, queue=queue, **settings
        )
        store = AdapterStore(config.store_dir, "fp")
        return TrainingService(config, store, "lori-d", MAX_EXAMPLES, reserved_names=("base", "continual"))

    return service


def messages(queue: str) -> list[tuple[str, list]]:
    """(task name, args) of every message waiting on ``queue``, oldest first."""
    raw = redis.Redis.from_url(REDIS_URL).lrange(queue, 0, -1)
    sent = [json.loads(m)["headers"] for m in reversed(raw)]  # kombu pushes on the left
    return [(h["task"], h["argsrepr"]) for h in sent]


def refusal(service: TrainingService, request: TaskCreate) -> tuple[int, str | None, str | None]:
    with pytest.raises(APIError) as refused:
        service.submit(request)
    return refused.value.status, refused.value.code, refused.value.param


def test_an_accepted_task_is_one_queued_job_and_one_message_naming_it(build: Build, queue: str) -> None:
    service = build()
    job = service.submit(task(hyperparameters={"r": 4}))
    assert (job.name, job.method, job.status) == ("colours", "lori-d", JobStatus.queued)  # the default method
    assert job.hyperparameters == {"r": 4}  # as given: the worker fills in the rest
    assert [e.prompt for e in service.board.examples(job.id)] == ["Sky:"]  # type: ignore[union-attr]
    assert messages(queue) == [(TRAIN_TASK, repr([job.id]))]
    assert job.n_validation_examples == 0 and service.board.validation_examples(job.id) == []
    checked = service.submit(
        task(name="sizes", validation_examples=[{"prompt": "Sea:", "completion": " blue"}])
    )
    assert checked.n_validation_examples == 1
    assert [e.prompt for e in service.board.validation_examples(checked.id)] == ["Sea:"]
    chosen = service.submit(task(name="shapes", method="lori-s"))
    assert chosen.method == "lori-s"
    assert [j.id for j in service.list()] == [job.id, checked.id, chosen.id]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"examples": [EXAMPLE] * (MAX_EXAMPLES + 1)}, (413, "too_many_examples", "examples")),
        (
            {"validation_examples": [EXAMPLE] * (MAX_EXAMPLES + 1)},
            (413, "too_many_examples", "validation_examples"),
        ),
        ({"name": "continual"}, (400, "reserved_name", "name")),
        ({"method": "no-such-method"}, (400, "unknown_method", "method")),
        ({"hyperparameters": {"r": 0}}, (400, "invalid_value", "hyperparameters.r")),
        ({"hyperparameters": {"no_such_knob": 1}}, (400, "invalid_value", "hyperparameters.no_such_knob")),
        ({"name": "Bad Name"}, (400, "invalid_name", "name")),  # admission's reason, as HTTP
        ({"hyperparameters": {"r": 256}}, (409, "rank_exceeded", "hyperparameters.r")),  # > max_lora_rank 128
    ],
)
def test_a_refused_task_is_the_error_users_see_and_records_and_sends_nothing(
    build: Build, queue: str, fields: dict[str, Any], expected: tuple[int, str, str]
) -> None:
    service = build()
    assert refusal(service, task(**fields)) == expected
    assert service.board.all() == [] and messages(queue) == []


def test_a_name_already_pending_is_a_409_and_a_full_queue_a_429(build: Build, queue: str) -> None:
    service = build(max_pending_tasks=2)
    first = service.submit(task())
    assert refusal(service, task()) == (409, "task_exists", "name")
    service.submit(task(name="shapes"))
    with pytest.raises(APIError) as full:
        service.submit(task(name="sizes"))
    assert (full.value.status, full.value.code, full.value.type) == (429, "queue_full", "rate_limit_error")
    assert "2 tasks are already pending (limit 2)" in full.value.message
    assert [j.name for j in service.board.all()] == ["colours", "shapes"]
    assert [args for _, args in messages(queue)][0] == repr([first.id])
    assert len(messages(queue)) == 2


def test_jobs_are_read_cancelled_and_an_unknown_id_is_a_404(build: Build) -> None:
    service = build()
    job = service.submit(task())
    assert service.get(job.id).status == JobStatus.queued
    assert service.cancel(job.id).status == JobStatus.cancelled  # a queued job: at once
    for call in (service.get, service.cancel):
        with pytest.raises(APIError) as missing:
            call("job-none")
        assert (missing.value.status, missing.value.code) == (404, "job_not_found")


def test_listing_fails_a_job_whose_worker_stopped_renewing(build: Build) -> None:
    service = build()
    job = service.submit(task())
    assert service.board.claim_next("gone-worker", lease_s=0.05) is not None
    time.sleep(0.1)
    (listed,) = service.list()
    assert listed.id == job.id and listed.status == JobStatus.failed
    assert listed.error is not None and listed.error.code == "worker_lost"


def test_a_job_shows_succeeded_only_once_this_replica_serves_its_version(build: Build) -> None:
    """Before, a client that polled until ``succeeded`` and then asked the model could get a 404:
    the worker marks the job on publishing, the replica swaps it in a moment later."""
    from tests.support.store import META, make_adapter

    service = build()
    job = service.submit(task())
    store = AdapterStore(service.store.root, "fp")
    published = store.publish("colours", make_adapter(0), {**META, "base_fingerprint": "fp"}, "concat")
    service.board.update(job.id, status=JobStatus.succeeded, task_version=published.task.id)
    served: list[str] = []
    service.served_here = lambda: served

    shown = service.get(job.id)
    assert shown.status == JobStatus.running and shown.finished_at is None
    assert "does not serve it yet" in shown.warnings[-1]
    assert [j.status for j in service.list()] == [JobStatus.running]
    served.append(published.task.id)  # the replica's sync swapped it in
    assert service.get(job.id).status == JobStatus.succeeded
    served.clear()
    store.remove_task("colours")  # gone from the store: the job did succeed, nothing will be served
    assert service.get(job.id).status == JobStatus.succeeded
