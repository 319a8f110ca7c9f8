"""Job records shared by the API and the worker."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from adapters_store.database import connect
from tests.support.database import unique_store
from trainer.config import Example
from trainer.contract.board import WORKER_LOST, JobBoard, JobNotFound, JobRefused, JobStatus, Progress
from trainer.contract.board_database import DatabaseJobRecords


@pytest.fixture(params=["file", "database"])
def board(request: pytest.FixtureRequest, tmp_path: Path) -> JobBoard:
    """Every test here runs against both backends: the board's rules must not depend on them."""
    if request.param == "file":
        return JobBoard(tmp_path)
    return JobBoard(records=DatabaseJobRecords(request.getfixturevalue("database_url"), unique_store()))


def test_jobs_get_increasing_arrival_numbers_and_keep_their_examples(board: JobBoard) -> None:
    first = board.create("a", "lori-s", {}, [Example("p1", "c1")])
    second = board.create("b", "lori-s", {"r": 4}, [Example("p2", "c2"), Example("p3", "c3")])
    assert (first.seq, second.seq) == (1, 2)
    assert [j.id for j in board.all()] == [first.id, second.id]
    assert board.examples(second.id) == [Example("p2", "c2"), Example("p3", "c3")]
    assert board.get(second.id).hyperparameters == {"r": 4}


def test_cancel_of_a_queued_job_is_immediate(board: JobBoard) -> None:
    job = board.create("a", "lori-s", {}, [Example("p", "c")])
    assert board.request_cancel(job.id).status == JobStatus.cancelled
    assert [j for j in board.all() if not j.status.terminal] == []


def test_cancel_of_a_running_job_is_a_request(board: JobBoard) -> None:
    job = board.create("a", "lori-s", {}, [Example("p", "c")])
    board.update(job.id, status=JobStatus.running, progress=Progress(step=3, total=10, loss=1.5))
    cancelled = board.request_cancel(job.id)
    assert cancelled.status == JobStatus.running and cancelled.cancel_requested
    assert board.get(job.id).progress == Progress(step=3, total=10, loss=1.5)


def test_finished_jobs_ignore_cancel(board: JobBoard) -> None:
    job = board.create("a", "lori-s", {}, [Example("p", "c")])
    board.update(job.id, status=JobStatus.succeeded)
    assert board.request_cancel(job.id).status == JobStatus.succeeded
    assert not board.get(job.id).cancel_requested


@pytest.mark.parametrize("job_id", ["job-nope", "../../etc/passwd", "job-../x", ""])
def test_unknown_or_hostile_ids_are_not_found(board: JobBoard, job_id: str) -> None:
    with pytest.raises(JobNotFound):
        board.get(job_id)


def _queue(board: JobBoard, *names: str) -> list[str]:
    return [board.create(name, "lori-d", {}, [Example("p", "c")]).id for name in names]


def test_claims_follow_arrival_order_one_at_a_time(board: JobBoard) -> None:
    first, second = _queue(board, "a", "b")
    claimed = board.claim_next("w1", lease_s=30)
    assert claimed is not None and claimed.id == first and claimed.status == JobStatus.validating
    assert board.claim_next("w2", lease_s=30) is None  # w1's claim holds: b waits
    assert board.update_claimed(first, "w1", status=JobStatus.succeeded) is not None
    following = board.claim_next("w2", lease_s=30)
    assert following is not None and following.id == second and following.worker == "w2"
    board.update_claimed(second, "w2", status=JobStatus.succeeded)
    assert board.claim_next("w2", lease_s=30) is None  # nothing queued


def test_a_lapsed_claim_fails_its_job_and_frees_the_queue(board: JobBoard) -> None:
    dead, waiting = _queue(board, "a", "b")
    board.claim_next("dead-worker", lease_s=0.05)
    time.sleep(0.1)
    claimed = board.claim_next("w2", lease_s=30)
    assert claimed is not None and claimed.id == waiting
    failed = board.get(dead)
    assert failed.status == JobStatus.failed and failed.error is not None
    assert failed.error.code == WORKER_LOST
    # the dead worker, should it come back, can neither renew nor overwrite the verdict
    assert board.renew(dead, "dead-worker", lease_s=30) is False
    assert board.update_claimed(dead, "dead-worker", status=JobStatus.succeeded) is None
    assert board.get(dead).status == JobStatus.failed


def test_renewing_keeps_a_claim_alive(board: JobBoard) -> None:
    (job_id,) = _queue(board, "a")
    board.claim_next("w1", lease_s=0.2)
    for _ in range(4):
        time.sleep(0.1)
        assert board.renew(job_id, "w1", lease_s=0.2)
    assert [j.status for j in board.fail_lapsed()] == [JobStatus.validating]
    assert board.renew(job_id, "someone-else", lease_s=0.2) is False


def test_concurrent_submissions_of_one_name_record_one_job(board: JobBoard) -> None:
    def submit(_: int) -> str:
        try:
            return board.create("same", "lori-d", {}, [Example("p", "c")]).id
        except JobRefused as refused:
            return refused.reason

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(submit, range(8)))
    assert outcomes.count("name_pending") == 7
    assert [j.name for j in board.all()] == ["same"]
    assert examples_kept(board) == 1, "refused jobs leave no examples behind"


def examples_kept(board: JobBoard) -> int:
    """How many jobs' examples the backend holds, whether or not a job record names them."""
    records = board.records
    if isinstance(records, DatabaseJobRecords):
        with connect(records.url) as connection:
            row = connection.execute(
                "SELECT count(*) FROM lamina_job_examples WHERE store = %s AND kind = 'examples'",
                (records.store,),
            ).fetchone()
        return int(row[0]) if row else 0
    return len(list(board.root.glob("*.examples.jsonl")))


def test_the_pending_queue_is_bounded_under_concurrency(board: JobBoard) -> None:
    def submit(i: int) -> str:
        try:
            return str(board.create(f"t{i}", "lori-d", {}, [Example("p", "c")], max_pending=3).seq)
        except JobRefused as refused:
            return refused.reason

    with ThreadPoolExecutor(max_workers=10) as pool:
        outcomes = list(pool.map(submit, range(10)))
    assert sorted(outcomes) == ["1", "2", "3"] + ["queue_full"] * 7
