"""Job records shared by the API and the worker."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import Example
from trainer.jobs import JobBoard, JobNotFound, JobStatus, Progress


@pytest.fixture
def board(tmp_path: Path) -> JobBoard:
    return JobBoard(tmp_path)


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
    assert board.active() == []


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
