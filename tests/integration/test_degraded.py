"""Degraded, not down: ``lamina serve`` with its Redis (broker and store events) unreachable at
start, then up, then gone again. It keeps answering, follows the store's ledger by polling,
says which mode it is in on /ready, refuses training with a 503 that records no job while the
queue cannot be reached, and takes tasks again by itself once Redis is back.

One server for the whole file (the tests run in file order and build on each other), a private
``redis-server`` on a port of its own, and no worker: a job that is accepted stays queued.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from adapters_store.fingerprint import fingerprint_model
from bench import serving_common as common
from tests.support.backend import MULTI_HOST, stack_board, stack_store
from tests.support.processes import RedisServer, RunningServer, start_server, stop_server

pytestmark = [pytest.mark.engine, pytest.mark.integration]

EXAMPLES = [{"prompt": f"Word {i} means", "completion": f" {w}"} for i, w in enumerate(["sun", "moon"])]
HYPERPARAMETERS = {"steps": 4, "r": 2, "seed": 0}
MODE_TIMEOUT_S = 30  # Redis seen (re)appearing or vanishing: retries every 2 s plus redis-py's own


class Degraded:
    def __init__(self, server: RunningServer, redis_server: RedisServer, home: Path) -> None:
        self.server, self.redis, self.home = server, redis_server, home

    @property
    def url(self) -> str:
        return self.server.url

    def ready(self) -> dict:
        response = httpx.get(f"{self.url}/ready", timeout=10)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def wait_mode(self, mode: str) -> None:
        deadline = time.monotonic() + MODE_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.ready()["events"] == mode:
                return
            time.sleep(0.2)
        pytest.fail(f"/ready never said events={mode}: {self.ready()}\n{self.server.log_tail(20)}")

    def post_task(self, name: str) -> httpx.Response:
        body = {"name": name, "method": "lori-d", "examples": EXAMPLES, "hyperparameters": HYPERPARAMETERS}
        return httpx.post(f"{self.url}/tasks", json=body, timeout=60)

    def jobs(self) -> list[dict]:
        return list(httpx.get(f"{self.url}/tasks", timeout=10).json()["data"])

    def board_files(self) -> list[str]:
        """What the job board holds: its files, or its rows when the store is in a database."""
        if MULTI_HOST:
            return [job.id for job in stack_board({"LAMINA_HOME": str(self.home)}).all()]
        jobs = self.home / "store" / "jobs"
        return sorted(p.name for p in jobs.iterdir() if not p.name.startswith(".")) if jobs.exists() else []

    def assert_answers(self, model: str = "base") -> None:
        body = {"model": model, "prompt": "Word 0 means", "max_tokens": 3, "temperature": 0}
        response = httpx.post(f"{self.url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] > 0


@pytest.fixture(scope="module")
def degraded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Degraded]:
    redis_server = RedisServer(tmp_path_factory.mktemp("redis"))  # not started: nothing listens
    home = tmp_path_factory.mktemp("lamina-home")
    env = {
        "LAMINA_HOME": str(home),
        "LAMINA_BROKER_URL": redis_server.url,  # the store events follow the broker's Redis
        "LAMINA_QUEUE": f"lamina-degraded-{uuid.uuid4().hex[:8]}",
    }
    server = start_server(env, home / "server.log")
    try:
        yield Degraded(server, redis_server, home)
    finally:
        stop_server(server)
        redis_server.stop()


def test_started_without_redis_it_serves_and_follows_the_ledger_by_polling(degraded: Degraded) -> None:
    assert degraded.ready()["events"] == "polling"
    degraded.assert_answers()


def test_without_the_queue_tasks_are_a_503_and_no_job_is_recorded(degraded: Degraded) -> None:
    refused = degraded.post_task("sun-moon")
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert error["code"] == "queue_unavailable" and "task queue cannot be reached" in error["message"]
    assert degraded.jobs() == [] and degraded.board_files() == []

    upload = httpx.post(
        f"{degraded.url}/v1/files",
        data={"purpose": "fine-tune"},
        files={"file": ("words.jsonl", "\n".join(json.dumps(e) for e in EXAMPLES))},
        timeout=30,
    )
    assert upload.status_code == 200, upload.text
    job = {"model": "base", "training_file": upload.json()["id"], "suffix": "sun-moon"}
    refused = httpx.post(f"{degraded.url}/v1/fine_tuning/jobs", json=job, timeout=60)
    assert refused.status_code == 503, refused.text
    assert httpx.get(f"{degraded.url}/v1/fine_tuning/jobs", timeout=10).json()["data"] == []
    assert degraded.jobs() == [] and degraded.board_files() == []


def test_without_redis_a_publish_goes_live_through_the_ledger_poll(
    degraded: Degraded, base_model_dir: Path
) -> None:
    # a writer that cannot announce
    store = stack_store(
        {"LAMINA_HOME": str(degraded.home)}, fingerprint_model(base_model_dir), base_model=str(base_model_dir)
    )
    published = common.publish_random(
        store, "synthetic", common.target_shapes(base_model_dir), 2, 1, "lori-d", "concat"
    )
    deadline = time.monotonic() + 30
    while degraded.ready()["live_merge"] != published.merge.id:
        assert time.monotonic() < deadline, f"never served {published.merge.id}: {degraded.ready()}"
        time.sleep(0.2)
    assert degraded.ready()["events"] == "polling"
    degraded.assert_answers("continual")


def test_when_redis_comes_up_events_resume_and_tasks_are_accepted(degraded: Degraded) -> None:
    degraded.redis.start()
    degraded.wait_mode("redis")
    accepted = degraded.post_task("sun-moon")
    assert accepted.status_code == 202, accepted.text
    assert [job["id"] for job in degraded.jobs()] == [accepted.json()["id"]]


def test_when_redis_goes_away_again_it_keeps_serving_and_refuses_tasks(degraded: Degraded) -> None:
    degraded.redis.stop()
    degraded.wait_mode("polling")
    degraded.assert_answers()
    refused = degraded.post_task("later")
    assert refused.status_code == 503, refused.text
    assert [job["name"] for job in degraded.jobs()] == ["sun-moon"]
