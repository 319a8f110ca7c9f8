"""Where the fine-tuning API keeps uploaded files, the progress points it records and the jobs'
OpenAI requests: files under the store's directory, or rows in PostgreSQL for servers on several hosts. Both backends must
behave alike (the tests of the classes run against each), and the database ones must share across
hosts what the file ones share through a directory."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import openai
import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg.types.json import Jsonb

from bench.object_storage import S3Server
from server.app import create_app
from server.errors import APIError
from server.finetuning import files as files_module
from server.finetuning.events import ProgressLog, ProgressPoints
from server.finetuning.events_database import DatabaseProgressLog
from server.finetuning.files import Files, FileStore
from server.finetuning.files_database import DatabaseFileStore
from server.finetuning.protocol import FineTuneRecord, Hyperparameters
from server.finetuning.records_database import DatabaseFineTuneRecords
from server.finetuning.service import FileFineTuneRecords, FineTuneRecords
from server.settings import ServerSettings
from tests.support.database import unique_store
from trainer.contract.board import Job, JobNotFound, Progress

HOSTILE_IDS = ["file-..", "../ledger", "file-../../ledger", "FILE-0123456789abcdef01234567", "file-0123", ""]
UNKNOWN_ID = "file-0123456789abcdef01234567"


@pytest.fixture(params=["file", "database"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def place(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """Where one store's files live: (backend, its directory or database URL + a store key)."""
    if backend == "file":
        return str(tmp_path), ""
    return request.getfixturevalue("database_url"), unique_store()


def open_files(backend: str, place: tuple[str, str]) -> Files:
    return FileStore(Path(place[0])) if backend == "file" else DatabaseFileStore(*place)


def open_progress(backend: str, place: tuple[str, str]) -> ProgressPoints:
    return ProgressLog(Path(place[0])) if backend == "file" else DatabaseProgressLog(*place)


def open_records(backend: str, place: tuple[str, str]) -> FineTuneRecords:
    return FileFineTuneRecords(Path(place[0])) if backend == "file" else DatabaseFineTuneRecords(*place)


@pytest.fixture
def files(backend: str, place: tuple[str, str]) -> Files:
    return open_files(backend, place)


@pytest.fixture
def progress(backend: str, place: tuple[str, str]) -> ProgressPoints:
    return open_progress(backend, place)


@pytest.fixture
def records(backend: str, place: tuple[str, str]) -> FineTuneRecords:
    return open_records(backend, place)


def not_found(call: object, *args: object) -> APIError:
    with pytest.raises(APIError) as caught:
        call(*args)  # type: ignore[operator]
    assert (caught.value.status, caught.value.code) == (404, "file_not_found"), caught.value.message
    return caught.value


# --- files --------------------------------------------------------------------------------------


def test_a_file_round_trips_and_is_gone_once_deleted(files: Files) -> None:
    content = b'{"prompt": "a", "completion": "b"}\n\x00\xff'  # any bytes, kept exactly
    made = files.create(content, "../../etc/train.jsonl", "fine-tune")
    assert made.id.startswith("file-") and made.bytes == len(content)
    assert made.filename == "train.jsonl"  # the name is recorded, never used as a path
    assert files.get(made.id) == made
    assert files.content(made.id) == content
    assert files.all() == [made]
    files.delete(made.id)
    assert not_found(files.get, made.id).param == "file_id"
    not_found(files.content, made.id)
    not_found(files.delete, made.id)
    assert files.all() == []


def test_uploaded_names_are_only_labels(files: Files) -> None:
    assert files.create(b"x", "C:\\data\\t.jsonl", "fine-tune").filename == "t.jsonl"
    assert files.create(b"x", "", "fine-tune").filename == "upload.jsonl"
    assert files.create(b"x", "n" * 300, "fine-tune").filename == "n" * 255


@pytest.mark.parametrize("file_id", [UNKNOWN_ID, *HOSTILE_IDS])
def test_unknown_and_hostile_ids_are_404s_naming_the_param(files: Files, file_id: str) -> None:
    assert not_found(files.get, file_id, "training_file").param == "training_file"
    assert not_found(files.content, file_id, "validation_file").param == "validation_file"
    assert not_found(files.delete, file_id).param == "file_id"


@pytest.mark.parametrize("file_id", HOSTILE_IDS)
def test_hostile_ids_are_refused_before_any_query(file_id: str) -> None:
    nowhere = DatabaseFileStore("postgresql://nobody@127.0.0.1:1/none", "s")  # any query would fail
    not_found(nowhere.get, file_id)
    not_found(nowhere.content, file_id)
    not_found(nowhere.delete, file_id)


def test_files_are_listed_newest_first_ties_by_id(files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = SimpleNamespace(time=lambda: 1000.0)
    monkeypatch.setattr(files_module, "time", clock)
    older = [files.create(b"x", f"{i}.jsonl", "fine-tune") for i in range(3)]
    clock.time = lambda: 2000.0
    newer = [files.create(b"x", f"{i}.jsonl", "fine-tune") for i in range(3)]
    expected = sorted(newer, key=lambda f: f.id, reverse=True) + sorted(
        older, key=lambda f: f.id, reverse=True
    )
    assert [f.id for f in files.all()] == [f.id for f in expected]
    assert {f.created_at for f in newer} == {2000}


def test_two_hosts_on_one_store_share_files_and_other_stores_do_not(database_url: str) -> None:
    store = unique_store()
    here, there = DatabaseFileStore(database_url, store), DatabaseFileStore(database_url, store)
    elsewhere = DatabaseFileStore(database_url, unique_store())
    made = here.create(b'{"prompt": "a", "completion": "b"}\n', "t.jsonl", "fine-tune")
    assert there.get(made.id) == made and there.content(made.id) == here.content(made.id)
    assert [f.id for f in there.all()] == [made.id]
    not_found(elsewhere.get, made.id)
    not_found(elsewhere.content, made.id)
    not_found(elsewhere.delete, made.id)
    assert elsewhere.all() == []
    assert here.get(made.id) == made  # the other store's refused delete left it alone
    there.delete(made.id)
    not_found(here.get, made.id)
    assert here.all() == []


# --- progress points ----------------------------------------------------------------------------


def job(job_id: str = "job-0123abcd", progress: Progress | None = None) -> Job:
    return Job.model_validate(
        {
            "id": job_id,
            "name": "codes",
            "method": "inflora",
            "seq": 1,
            "created_at": "2026-01-01T00:00:00.000+00:00",
            "n_examples": 6,
            "progress": progress,
        }
    )


def test_each_step_is_recorded_once_in_step_order(progress: ProgressPoints) -> None:
    progress.observe(job())  # no progress yet: nothing to record
    assert progress.points("job-0123abcd") == []
    for step, loss in [(2, 1.5), (2, 1.4), (1, 3.0), (3, 0.5), (2, 9.9)]:
        progress.observe(job(progress=Progress(step=step, total=3, loss=loss)))
    points = progress.points("job-0123abcd")
    assert [(p["step"], p["total"], p["loss"]) for p in points] == [(1, 3, 3.0), (2, 3, 1.5), (3, 3, 0.5)]
    assert all(isinstance(p["at"], int) for p in points)
    assert progress.points("job-ffff0000") == []


def test_two_servers_recording_one_step_keep_one_point(backend: str, place: tuple[str, str]) -> None:
    one, other = open_progress(backend, place), open_progress(backend, place)
    one.observe(job(progress=Progress(step=5, total=10, loss=0.7)))
    other.observe(job(progress=Progress(step=5, total=10, loss=0.6)))
    other.observe(job("job-00000001", Progress(step=5, total=10, loss=0.1)))  # another job: its own
    assert [(p["step"], p["loss"]) for p in one.points("job-0123abcd")] == [(5, 0.7)]
    assert [(p["step"], p["loss"]) for p in other.points("job-0123abcd")] == [(5, 0.7)]
    assert [p["loss"] for p in one.points("job-00000001")] == [0.1]


def test_stores_in_one_database_keep_their_own_points(database_url: str) -> None:
    one, other = (
        DatabaseProgressLog(database_url, unique_store()),
        DatabaseProgressLog(database_url, unique_store()),
    )
    one.observe(job(progress=Progress(step=1, total=2, loss=0.5)))
    assert other.points("job-0123abcd") == []


# --- the jobs' OpenAI requests ------------------------------------------------------------------

HOSTILE_JOB_IDS = ["job-..", "../ledger", "job-../../ledger", "job-", "job-a b", "JOB-0123abcd", ""]


def record(job_id: str = "job-0123abcd", **fields: object) -> FineTuneRecord:
    return FineTuneRecord.model_validate(
        {
            "job_id": job_id,
            "model": "base",
            "training_file": UNKNOWN_ID,
            "validation_file": "file-fedcba9876543210fedcba98",
            "suffix": "codes",
            "seed": 7,
            "metadata": {"lamina_method": "lori-d", "team": "search"},
            "hyperparameters": Hyperparameters(n_epochs=3, batch_size="auto", learning_rate_multiplier=0.5),
            **fields,
        }
    )


def test_a_record_reads_back_whole_and_only_for_its_job(records: FineTuneRecords) -> None:
    made = record()
    records.put(made)
    assert records.get("job-0123abcd") == made
    assert records.get("job-ffff0000") is None  # a job posted to /tasks has none
    other = record("job-00000001", suffix=None, metadata=None, validation_file=None)
    records.put(other)
    wanted = ["job-0123abcd", "job-ffff0000", "job-00000001", "job-0123abcd"]
    assert records.many(wanted) == {"job-0123abcd": made, "job-00000001": other}
    assert records.many(iter(["job-00000001"])) == {"job-00000001": other}  # any iterable, read once
    assert records.many([]) == {}
    replaced = record(suffix="again")
    records.put(replaced)  # written again (as an atomic file replace would): the last one stays
    assert records.get("job-0123abcd") == replaced


@pytest.mark.parametrize("job_id", HOSTILE_JOB_IDS)
def test_hostile_job_ids_have_no_record_and_are_never_written(records: FineTuneRecords, job_id: str) -> None:
    assert records.get(job_id) is None
    assert records.many([job_id, "job-0123abcd"]) == {}
    with pytest.raises(JobNotFound):
        records.put(record(job_id))


@pytest.mark.parametrize("job_id", HOSTILE_JOB_IDS)
def test_hostile_job_ids_are_refused_before_any_query(job_id: str) -> None:
    nowhere = DatabaseFineTuneRecords("postgresql://nobody@127.0.0.1:1/none", "s")  # any query would fail
    assert nowhere.get(job_id) is None
    assert nowhere.many([job_id]) == {}
    with pytest.raises(JobNotFound):
        nowhere.put(record(job_id))


def test_what_does_not_read_as_a_record_is_no_record(backend: str, place: tuple[str, str]) -> None:
    records = open_records(backend, place)
    records.put(record("job-00000001"))
    garbage = {"job_id": "job-0123abcd", "model": "base"}  # no training file: not a record
    if backend == "file":
        (Path(place[0]) / "finetuning" / "jobs" / "job-0123abcd.json").write_text(json.dumps(garbage))
    else:
        with psycopg.connect(place[0]) as connection:
            connection.execute(
                "INSERT INTO lamina_finetuning_jobs (store, job_id, record) VALUES (%s, %s, %s)",
                (place[1], "job-0123abcd", Jsonb(garbage)),
            )
    assert records.get("job-0123abcd") is None
    assert list(records.many(["job-0123abcd", "job-00000001"])) == ["job-00000001"]


def test_two_hosts_on_one_store_share_records_and_other_stores_do_not(database_url: str) -> None:
    store = unique_store()
    here, there = DatabaseFineTuneRecords(database_url, store), DatabaseFineTuneRecords(database_url, store)
    elsewhere = DatabaseFineTuneRecords(database_url, unique_store())
    made = record()
    here.put(made)
    assert there.get(made.job_id) == made and there.many([made.job_id]) == {made.job_id: made}
    assert elsewhere.get(made.job_id) is None and elsewhere.many([made.job_id]) == {}
    elsewhere.put(record(suffix="theirs"))  # the same job id in another store: its own row
    assert here.get(made.job_id) == made


# --- two servers, each with its own home, sharing a database and a bucket -----------------------


@pytest.fixture
def two_servers(
    base_model_dir: Path, tmp_path: Path, database_url: str, s3: S3Server
) -> Iterator[tuple[TestClient, TestClient]]:
    store = f"{s3.store_url()}-{unique_store()}"

    def settings(host: str) -> ServerSettings:
        return ServerSettings(
            model=base_model_dir,
            home=tmp_path / host,
            database_url=database_url,
            store=store,
            s3_endpoint_url=s3.endpoint_url,
        )

    with (
        TestClient(create_app(settings("host-a"), start_engine=False)) as a,
        TestClient(create_app(settings("host-b"), start_engine=False)) as b,
    ):
        yield a, b


def sdk(client: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


def test_a_file_uploaded_to_one_server_trains_a_job_created_on_another(
    two_servers: tuple[TestClient, TestClient], tmp_path: Path
) -> None:
    a, b = two_servers
    lines = [
        {"prompt": "Code word for apple:", "completion": " zulu"},
        {"prompt": "pear:", "completion": " kilo"},
    ]
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    uploaded = sdk(a).files.create(file=("t.jsonl", content), purpose="fine-tune")
    assert not (tmp_path / "host-a" / "store" / "files").exists()  # a row, not a file on host a
    assert [f.id for f in sdk(b).files.list()] == [uploaded.id]
    assert sdk(b).files.content(uploaded.id).content == content
    validation = sdk(a).files.create(file=("v.jsonl", content), purpose="fine-tune")
    job = sdk(b).fine_tuning.jobs.create(
        training_file=uploaded.id,
        validation_file=validation.id,
        model="base",
        suffix="codes",
        seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 2}}},
        metadata={"lamina_method": "lori-d", "team": "search"},
    )
    task = a.get(f"/tasks/{job.model_extra['lamina_job_id']}").json()  # type: ignore[index]
    assert (task["name"], task["n_examples"]) == ("codes", 2)

    # The job's OpenAI request reads back whole on the other server: retrieved, listed, its events.
    assert not (tmp_path / "host-b" / "store" / "finetuning" / "jobs").exists()  # a row, not a file
    retrieved = sdk(a).fine_tuning.jobs.retrieve(job.id)
    (listed,) = sdk(a).fine_tuning.jobs.list().data
    for seen in (retrieved, listed):
        assert seen.id == job.id
        assert (seen.training_file, seen.validation_file) == (uploaded.id, validation.id)
        assert seen.metadata == {"lamina_method": "lori-d", "team": "search"}
        assert (seen.hyperparameters.n_epochs, seen.hyperparameters.batch_size) == (3, 2)
        assert seen.hyperparameters.learning_rate_multiplier == "auto"
        assert seen.model_dump() == job.model_dump()
    events = sdk(a).fine_tuning.jobs.list_events(job.id).data
    assert any(e.message.startswith(f"validation_file {validation.id}") for e in events)

    assert sdk(b).files.delete(uploaded.id).deleted
    assert sdk(b).files.delete(validation.id).deleted
    assert list(sdk(a).files.list()) == []
