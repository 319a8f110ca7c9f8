"""A task is what a user posts; a job is one attempt to learn it. ``POST /tasks`` answers with a
job, followed at ``/jobs/{job_id}``; the earlier ``/tasks/{job_id}`` names keep working and are
marked deprecated. The broker is the test Redis; no worker runs, so jobs stay queued."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import ServerSettings

TASK = {"name": "colours", "method": "lori-d", "examples": [{"prompt": "Sky:", "completion": " blue"}]}


@pytest.fixture
def client(base_model_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    settings = ServerSettings(model=base_model_dir, home=tmp_path, broker_url="redis://127.0.0.1:6379/0")
    with TestClient(create_app(settings, start_engine=False)) as test_client:
        yield test_client


def test_a_posted_task_is_followed_and_cancelled_as_a_job(client: TestClient) -> None:
    posted = client.post("/tasks", json=TASK)
    assert posted.status_code == 202, posted.text
    job = posted.json()
    assert job["name"] == "colours" and job["status"] == "queued"

    assert client.get(f"/jobs/{job['id']}").json() == job
    assert [listed["id"] for listed in client.get("/jobs").json()["data"]] == [job["id"]]
    cancelled = client.post(f"/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"

    missing = client.get("/jobs/job-does-not-exist")
    assert missing.status_code == 404


def test_the_earlier_task_urls_still_answer_for_jobs(client: TestClient) -> None:
    job = client.post("/tasks", json=TASK).json()
    assert client.get(f"/tasks/{job['id']}").json() == client.get(f"/jobs/{job['id']}").json()
    assert client.get("/tasks").json() == client.get("/jobs").json()
    assert client.post(f"/tasks/{job['id']}/cancel").json()["status"] == "cancelled"


def test_the_schema_names_jobs_and_marks_the_old_urls_deprecated(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not paths["/jobs/{job_id}"]["get"].get("deprecated", False)
    assert paths["/tasks/{job_id}"]["get"]["deprecated"] is True
    assert paths["/tasks"]["get"]["deprecated"] is True
    assert not paths["/tasks"]["post"].get("deprecated", False), "posting a task is the name to keep"
    operation_ids = [op["operationId"] for ops in paths.values() for op in ops.values()]
    assert len(operation_ids) == len(set(operation_ids))


def test_posting_a_task_does_not_stall_the_event_loop(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A submit blocks (hashing, the board's file lock, the broker call: here a slow broker); the
    server's other requests, streams among them, must go on meanwhile. Before, POST /tasks ran the
    submit on the event loop and every request waited for it."""
    import asyncio
    import time

    import httpx

    service = client.app.state.training  # type: ignore[attr-defined]
    real_submit = service.submit

    def slow_broker(body):  # noqa: ANN001, ANN202
        time.sleep(1.0)
        return real_submit(body)

    monkeypatch.setattr(service, "submit", slow_broker)

    async def scenario() -> list[str]:
        done: list[str] = []
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://lamina") as http:

            async def post() -> None:
                assert (await http.post("/tasks", json=TASK)).status_code == 202
                done.append("post")

            async def health() -> None:
                await asyncio.sleep(0.2)  # the submit is blocking by now
                assert (await http.get("/health")).status_code == 200
                done.append("health")

            await asyncio.gather(post(), health())
        return done

    assert asyncio.run(scenario()) == ["health", "post"]
