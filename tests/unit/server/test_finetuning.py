"""OpenAI's files and fine-tuning API over the job board, without the engine or a worker: the
mapping onto Lamina's tasks as pure functions, and the routes driven by the official ``openai``
client through FastAPI's test client (jobs are queued on the board; none trains here)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.errors import APIError
from server.finetuning.events import job_events
from server.finetuning.files_database import DatabaseFileStore
from server.finetuning.mapping import STATUS, lamina_job_id, openai_job_id, plan, to_openai
from server.finetuning.protocol import FineTuneRecord, FineTuningJobCreate, Hyperparameters
from server.settings import ServerSettings
from trainer import auto
from trainer.contract.board import Job, JobError, JobStatus, Progress

FILE_ID = "file-0123456789abcdef01234567"
EXAMPLES = [
    {"prompt": "Code word for apple:", "completion": " zulu"},
    {"messages": [{"role": "user", "content": "river?"}, {"role": "assistant", "content": "kilo"}]},
]


def request(**fields: object) -> FineTuningJobCreate:
    return FineTuningJobCreate.model_validate({"model": "base", "training_file": FILE_ID, **fields})


def refused(param: str, **fields: object) -> APIError:
    with pytest.raises(APIError) as caught:
        plan(request(**fields), {"base"}, "inflora")
    assert (caught.value.status, caught.value.param) == (400, param), caught.value.message
    return caught.value


# --- mapping ------------------------------------------------------------------------------------


def test_defaults_leave_everything_to_lamina() -> None:
    planned = plan(request(), {"base"}, "inflora")
    assert planned.name == "ft-0123456789ab"  # from the file id
    assert planned.method == "inflora"
    assert planned.hyperparameters == {}  # every value auto
    assert planned.requested == Hyperparameters()


def test_supervised_hyperparameters_map_onto_lamina_names() -> None:
    hp = {"n_epochs": 4, "batch_size": 2, "learning_rate_multiplier": 0.5}
    planned = plan(
        request(method={"type": "supervised", "supervised": {"hyperparameters": hp}}, seed=3, suffix="codes"),
        {"base"},
        "inflora",
    )
    assert planned.name == "codes"
    rate = 0.5 * auto.LEARNING_RATE["inflora"]  # inflora trains all of B: its auto rate, halved
    assert planned.hyperparameters == {"epochs": 4, "batch_size": 2, "learning_rate": rate, "seed": 3}


def test_the_older_top_level_hyperparameters_are_read_too() -> None:
    planned = plan(request(hyperparameters={"n_epochs": 2}), {"base"}, "inflora")
    assert planned.hyperparameters == {"epochs": 2}


def test_metadata_picks_the_lamina_preset_and_scales_its_own_auto_rate() -> None:
    planned = plan(
        request(metadata={"lamina_method": "lori-s"}, hyperparameters={"learning_rate_multiplier": 0.1}),
        {"base"},
        "inflora",
    )
    assert planned.method == "lori-s"
    # LoRI-S trains 10 % of B: its auto rate is 10x LoRI's, capped at MAX_LEARNING_RATE
    assert planned.hyperparameters["learning_rate"] == pytest.approx(0.1 * auto.MAX_LEARNING_RATE)


def test_refusals_name_the_openai_field() -> None:
    refused("model", model="gpt-4o-mini")
    refused("method.type", method={"type": "dpo"})
    refused("metadata.lamina_method", metadata={"lamina_method": "no-such-method"})
    refused("suffix", suffix="Not A Name")
    refused("integrations", integrations=[{"type": "wandb"}])
    refused(
        "hyperparameters",
        hyperparameters={"n_epochs": 2},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}},
    )
    error = refused(
        "hyperparameters.learning_rate_multiplier",
        hyperparameters={"learning_rate_multiplier": 100},
        metadata={"lamina_method": "lori-s"},  # auto rate 0.05: x100 is 5
    )
    assert "above 1" in error.message


def test_every_lamina_status_has_an_openai_one() -> None:
    assert set(STATUS) == set(JobStatus)
    assert STATUS[JobStatus.validating] == "validating_files"
    assert {STATUS[s] for s in JobStatus} == {
        "validating_files",
        "queued",
        "running",
        "succeeded",
        "failed",
        "cancelled",
    }


def test_job_ids_round_trip_and_nothing_else_maps() -> None:
    assert lamina_job_id(openai_job_id("job-abc123")) == "job-abc123"
    for bad in ("job-abc123", "ftjob-../x", "ftjob-", "file-abc"):
        assert lamina_job_id(bad) is None


def _job(**fields: object) -> Job:
    base = {
        "id": "job-0123abcd",
        "name": "codes",
        "method": "inflora",
        "seq": 1,
        "created_at": "2026-01-01T00:00:00.000+00:00",
        "n_examples": 6,
    }
    return Job.model_validate({**base, **fields})


def test_a_succeeded_job_reports_what_trained_and_its_model() -> None:
    job = _job(
        status="succeeded",
        finished_at="2026-01-01T00:01:00.000+00:00",
        hyperparameters={"steps": 30, "batch_size": 3, "learning_rate": 0.01, "seed": 0},
        metrics={"examples": 6, "completion_tokens": 120, "final_loss": 0.01},
        task_version="t1",
    )
    record = FineTuneRecord(
        job_id=job.id, model="base", training_file=FILE_ID, seed=0, hyperparameters=Hyperparameters()
    )
    out = to_openai(job, record, "base")
    assert (out.id, out.status, out.fine_tuned_model) == ("ftjob-0123abcd", "succeeded", "codes")
    assert out.finished_at is not None and out.finished_at - out.created_at == 60
    # 30 steps of 3 out of 6 examples = 15 epochs; 0.01 = 2x inflora's auto rate
    assert out.hyperparameters == Hyperparameters(n_epochs=15, batch_size=3, learning_rate_multiplier=2.0)
    assert out.trained_tokens == 120 and out.training_file == FILE_ID


def test_a_queued_job_reports_what_was_asked_and_no_model() -> None:
    asked = Hyperparameters(n_epochs=2)
    record = FineTuneRecord(
        job_id="job-0123abcd", model="base", training_file=FILE_ID, seed=0, hyperparameters=asked
    )
    out = to_openai(_job(hyperparameters={"epochs": 2}), record, "base")
    assert (out.status, out.fine_tuned_model, out.hyperparameters) == ("queued", None, asked)
    failed = to_openai(_job(status="failed", error=JobError(message="boom")), record, "base")
    assert failed.error is not None and (failed.error.code, failed.error.message) == (
        "training_failed",
        "boom",
    )


def test_events_carry_each_recorded_loss_newest_first() -> None:
    job = _job(
        status="succeeded",
        started_at="2026-01-01T00:00:10.000+00:00",
        finished_at="2026-01-01T00:01:00.000+00:00",
        progress=Progress(step=20, total=20, loss=0.05),
        metrics={"initial_loss": 3.0, "final_loss": 0.05},
        warnings=["did not learn everything"],
    )
    points = [{"step": 10, "total": 20, "loss": 1.5, "at": job_time(20)}]
    events = job_events(job, None, points)
    losses = [
        (e.data or {}).get("train_loss") for e in events if e.type == "metrics" and "step" in (e.data or {})
    ]
    assert losses == [0.05, 1.5]  # the final step (from the board) and the one seen while training
    assert events[0].message.startswith("The job has successfully completed")
    assert events[-1].message.startswith("Created fine-tuning job")
    assert any(e.level == "warn" and e.message == "did not learn everything" for e in events)
    assert len({e.id for e in events}) == len(events)
    assert [e.id for e in job_events(job, None, points)] == [e.id for e in events]  # stable ids


def job_time(seconds: int) -> int:
    return 1767225600 + seconds  # 2026-01-01T00:00:00Z


# --- the routes, through the official client ----------------------------------------------------


@pytest.fixture(params=["file", "database"])
def backend(request: pytest.FixtureRequest) -> str:
    """The routes run with files under the store and with LAMINA_DATABASE_URL (rows, every host's)."""
    return str(request.param)


@pytest.fixture
def app_client(
    backend: str, base_model_dir: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[TestClient]:
    database = {"database_url": request.getfixturevalue("database_url")} if backend == "database" else {}
    settings = ServerSettings(model=base_model_dir, home=tmp_path, max_file_bytes=2048, **database)
    with TestClient(create_app(settings, start_engine=False)) as test_client:
        yield test_client


@pytest.fixture
def sdk(app_client: TestClient) -> openai.OpenAI:
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key="unused", http_client=app_client, max_retries=0
    )


def jsonl(*lines: object) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def test_files_round_trip(
    sdk: openai.OpenAI, app_client: TestClient, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    content = jsonl(*EXAMPLES)
    uploaded = sdk.files.create(file=("../../etc/train.jsonl", content), purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.bytes == len(content)
    assert uploaded.filename == "train.jsonl"  # the name is recorded, never used as a path
    on_disk = tmp_path / "store" / "files"
    if backend == "file":
        assert (on_disk / f"{uploaded.id}.jsonl").read_bytes() == content
    else:  # a row of the store's, nothing on this host's disk
        rows = DatabaseFileStore(request.getfixturevalue("database_url"), str((tmp_path / "store").resolve()))
        assert rows.content(uploaded.id) == content and not on_disk.exists()
    assert sdk.files.retrieve(uploaded.id).id == uploaded.id
    assert [f.id for f in sdk.files.list()] == [uploaded.id]
    assert sdk.files.content(uploaded.id).content == content
    assert sdk.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(uploaded.id)
    assert list(sdk.files.list()) == []
    assert not on_disk.exists() or not list(on_disk.iterdir())


def test_unknown_and_malformed_ids_are_404s(sdk: openai.OpenAI) -> None:
    for file_id in ("file-000000000000000000000000", "file-..", "nope"):
        with pytest.raises(openai.NotFoundError) as caught:
            sdk.files.retrieve(file_id)
        assert caught.value.body["param"] == "file_id"  # type: ignore[index]
    for path in ("file-../../ledger", "file-..%2F..%2Fledger"):  # no route, never a path outside
        with pytest.raises(openai.NotFoundError):
            sdk.files.content(path)
    for job_id in ("ftjob-000000", "job-123", "ftjob-..%2F"):
        with pytest.raises(openai.NotFoundError):
            sdk.fine_tuning.jobs.retrieve(job_id)
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.fine_tuning.jobs.create(training_file="file-000000000000000000000000", model="base")
    assert caught.value.body["param"] == "training_file"  # type: ignore[index]


def test_uploads_are_checked(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.files.create(file=("t.jsonl", jsonl(*EXAMPLES)), purpose="assistants")
    assert caught.value.body["param"] == "purpose"  # type: ignore[index]
    bad = jsonl(EXAMPLES[0], {"prompt": "no completion"})
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.files.create(file=("t.jsonl", bad), purpose="fine-tune")
    assert "line 2" in caught.value.message and "completion" in caught.value.message
    with pytest.raises(openai.APIStatusError) as too_big:
        sdk.files.create(file=("t.jsonl", jsonl(*EXAMPLES * 40)), purpose="fine-tune")
    assert too_big.value.status_code == 413 and too_big.value.body["param"] == "file"  # type: ignore[index]
    assert list(sdk.files.list()) == []  # nothing refused was kept


def test_a_job_is_a_task_on_the_shared_board(sdk: openai.OpenAI, app_client: TestClient) -> None:
    training = sdk.files.create(file=("t.jsonl", jsonl(*EXAMPLES)), purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(
        training_file=training.id,
        model="base",
        suffix="codes",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}},
        metadata={"lamina_method": "lori-d"},
    )
    assert (job.status, job.fine_tuned_model, job.training_file) == ("queued", None, training.id)
    assert job.metadata == {"lamina_method": "lori-d"} and job.hyperparameters.n_epochs == 3
    task = app_client.get(f"/tasks/{job.model_extra['lamina_job_id']}").json()  # type: ignore[index]
    assert (task["name"], task["method"], task["hyperparameters"]) == ("codes", "lori-d", {"epochs": 3})
    assert task["n_examples"] == 2

    # A second job of the same name is refused naming suffix, as POST /tasks names name.
    with pytest.raises(openai.ConflictError) as caught:
        sdk.fine_tuning.jobs.create(training_file=training.id, model="base", suffix="codes")
    assert caught.value.body["param"] == "suffix"  # type: ignore[index]

    # A task posted to /tasks is on the same list.
    posted = app_client.post("/tasks", json={"name": "other", "method": "lori-d", "examples": [EXAMPLES[0]]})
    listed = sdk.fine_tuning.jobs.list()
    assert [j.id for j in listed.data] == [openai_job_id(posted.json()["id"]), job.id]  # newest first
    assert listed.data[0].training_file is None
    page = sdk.fine_tuning.jobs.list(limit=1)
    assert page.has_more and [j.id for j in page.get_next_page().data] == [job.id]

    cancelled = sdk.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and sdk.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    events = sdk.fine_tuning.jobs.list_events(job.id).data
    assert [e.message.split(" ")[0] for e in events] == ["The", "Created"]
    assert list(sdk.fine_tuning.jobs.checkpoints.list(job.id)) == []


def test_job_requests_are_checked_before_anything_is_queued(
    sdk: openai.OpenAI, app_client: TestClient
) -> None:
    training = sdk.files.create(file=("t.jsonl", jsonl(*EXAMPLES)), purpose="fine-tune")
    for fields, param in [
        ({"model": "gpt-4o-mini"}, "model"),
        ({"suffix": "Bad Name"}, "suffix"),
        ({"method": {"type": "reinforcement"}}, "method.type"),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
        ({"metadata": {"lamina_method": "nope"}}, "metadata.lamina_method"),
    ]:
        body = {"training_file": training.id, "model": "base", **fields}
        with pytest.raises(openai.BadRequestError) as caught:
            sdk.fine_tuning.jobs.create(**body)  # type: ignore[arg-type]
        assert caught.value.body["param"] == param, caught.value.message  # type: ignore[index]
    assert app_client.get("/tasks").json()["data"] == []
