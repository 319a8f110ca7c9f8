"""The job board kept in PostgreSQL: what the file board gets from sharing one directory (every
host sees every job, the lock spans hosts) must hold for boards that share only a database.
The board's rules themselves run against both backends in test_jobs.py and test_fence.py."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.database import unique_store
from trainer.config import Example
from trainer.contract.board import JobBoard, JobNotFound, JobRefused, JobStatus
from trainer.contract.board_database import DatabaseJobRecords


def board(url: str, store: str) -> JobBoard:
    return JobBoard(records=DatabaseJobRecords(url, store))


def test_two_hosts_on_one_store_see_each_others_jobs(database_url: str) -> None:
    store = unique_store()
    api, worker = board(database_url, store), board(database_url, store)
    job = api.create("a", "lori-d", {"r": 4}, [Example("p", "c")], validation=[Example("v", "w")])
    claimed = worker.claim_next("w1", lease_s=30)
    assert claimed is not None and claimed.id == job.id
    assert worker.examples(job.id) == [Example("p", "c")]
    assert worker.validation_examples(job.id) == [Example("v", "w")]
    assert api.request_cancel(job.id).cancel_requested  # running on the worker's host: a request
    assert worker.get(job.id).cancel_requested and worker.get(job.id).status == JobStatus.validating


def test_concurrent_creates_and_claims_on_two_hosts_are_serialized(database_url: str) -> None:
    store = unique_store()
    boards = [board(database_url, store), board(database_url, store)]

    def submit(i: int, name: str) -> str:
        try:
            return str(boards[i % 2].create(name, "lori-d", {}, [Example("p", "c")]).seq)
        except JobRefused as refused:
            return refused.reason

    with ThreadPoolExecutor(max_workers=12) as pool:
        same = list(pool.map(lambda i: submit(i, "same"), range(12)))
        distinct = list(pool.map(lambda i: submit(i, f"t{i}"), range(12)))
        claims = list(pool.map(lambda i: boards[i % 2].claim_next(f"w{i}", lease_s=30), range(12)))
    assert sorted(same) == ["1"] + ["name_pending"] * 11
    assert sorted(int(seq) for seq in distinct) == list(range(2, 14))
    assert [j.seq for j in boards[1].all()] == list(range(1, 14))
    assert [c.seq for c in claims if c is not None] == [1], "one claim at a time, the earliest job"


def test_stores_in_one_database_do_not_see_each_other(database_url: str) -> None:
    one, other = board(database_url, unique_store()), board(database_url, unique_store())
    job = one.create("a", "lori-d", {}, [Example("p", "c")])
    twin = other.create("a", "lori-d", {}, [Example("q", "d")])  # same name: no name_pending across stores
    assert (job.seq, twin.seq) == (1, 1)
    assert [j.id for j in one.all()] == [job.id] and [j.id for j in other.all()] == [twin.id]
    with pytest.raises(JobNotFound):
        other.get(job.id)
    with pytest.raises(JobNotFound):
        other.examples(job.id)
    assert other.claim_next("w", lease_s=30) is not None and one.get(job.id).status == JobStatus.queued


@pytest.mark.parametrize("job_id", ["../../etc/passwd", "job-'; DROP TABLE lamina_jobs; --", "job-%s", ""])
def test_hostile_ids_are_not_found(database_url: str, job_id: str) -> None:
    """Refused before any SQL is sent, by the reads and by the writes alike."""
    jobs = board(database_url, unique_store())
    for call in (jobs.get, jobs.examples, jobs.request_cancel, jobs.current):
        with pytest.raises(JobNotFound):
            call(job_id)
    with pytest.raises(JobNotFound):
        jobs.records.put_examples(job_id, "examples", "")
    assert jobs.all() == [] and jobs.create("a", "lori-d", {}, [Example("p", "c")]).seq == 1
