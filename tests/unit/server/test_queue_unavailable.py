"""POST /tasks when the task queue cannot be reached: a 503 naming the queue, and no job on the
board that no worker would ever be told about. The broker is real (a port where nothing
listens, or the test Redis); only ``send_task`` is replaced where the test is about a send
that fails after the check passed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from adapters_store.fingerprint import fingerprint_model
from adapters_store.store import AdapterStore
from server.errors import APIError
from server.settings import ServerSettings
from server.training.protocol import TaskCreate
from server.training.service import TrainingService
from tests.support.processes import free_port

REDIS_URL = "redis://127.0.0.1:6379/0"
TASK = TaskCreate.model_validate(
    {"name": "colours", "method": "lori-d", "examples": [{"prompt": "Sky:", "completion": " blue"}]}
)

Build = Callable[[str], TrainingService]


@pytest.fixture
def build(base_model_dir: Path, tmp_path: Path) -> Build:
    def service(broker_url: str) -> TrainingService:
        settings = ServerSettings(model=base_model_dir, home=tmp_path, broker_url=broker_url)
        store = AdapterStore(settings.store_dir, fingerprint_model(base_model_dir))
        return TrainingService(settings, store, "lori-d", 100)

    return service


def board_files(service: TrainingService) -> list[str]:
    return sorted(p.name for p in service.board.root.iterdir() if not p.name.startswith("."))


def require_redis() -> None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError:
        pytest.fail(f"Redis is required at {REDIS_URL}")


def test_an_unreachable_broker_is_a_503_and_records_nothing(build: Build) -> None:
    service = build(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    with pytest.raises(APIError) as refused:
        service.submit(TASK)
    assert (refused.value.status, refused.value.code) == (503, "queue_unavailable")
    assert "task queue cannot be reached" in refused.value.message
    assert service.board.all() == [] and board_files(service) == []


def test_a_send_that_fails_after_the_check_takes_its_job_back(
    build: Build, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_redis()
    service = build(REDIS_URL)

    def broker_went_away(*_: object, **__: object) -> None:
        raise ConnectionError("broker went away")

    monkeypatch.setattr(service.celery, "send_task", broker_went_away)
    with pytest.raises(APIError) as refused:
        service.submit(TASK)
    assert refused.value.status == 503
    assert service.board.all() == [] and board_files(service) == []


def test_a_job_a_worker_claimed_before_the_send_failed_stays_and_is_accepted(
    build: Build, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_redis()
    service = build(REDIS_URL)

    def claimed_then_failed(*_: object, **__: object) -> None:
        assert service.board.claim_next("worker-draining-the-board", lease_s=30) is not None
        raise ConnectionError("broker went away")

    monkeypatch.setattr(service.celery, "send_task", claimed_then_failed)
    job = service.submit(TASK)
    assert service.board.get(job.id).worker == "worker-draining-the-board"
    assert service.board.examples(job.id)  # its data stays with it
