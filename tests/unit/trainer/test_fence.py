"""The claim fence between the job board and the store: a worker publishes only while the claim
it trained under still holds, checked under the store's writer lock."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from adapters_store.errors import FenceLost
from adapters_store.interface import check_fence
from adapters_store.store import AdapterStore
from tests.support.database import unique_store
from tests.support.store import FP, META, backend_options, make_adapter, visible_versions
from trainer.config import Example
from trainer.contract.board import WORKER_LOST, JobBoard, JobStatus
from trainer.contract.board_database import DatabaseJobRecords


@pytest.fixture(params=["file", "database", "object-storage"])
def kind(request: pytest.FixtureRequest) -> str:
    """Every test here runs on each backend: the board's and the store's rules must not depend
    on where jobs, the ledger and the files are kept (tests/support/store.py)."""
    return str(request.param)


@pytest.fixture
def board(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> JobBoard:
    if kind == "file":
        return JobBoard(tmp_path)
    return JobBoard(records=DatabaseJobRecords(request.getfixturevalue("database_url"), unique_store()))


@pytest.fixture
def store(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path, FP, **backend_options(kind, request))


def queue(board: JobBoard, *names: str) -> list[str]:
    return [board.create(name, "lori-d", {}, [Example("p", "c")]).id for name in names]


def test_each_claim_gets_the_next_generation(board: JobBoard) -> None:
    first, second = queue(board, "a", "b")
    one = board.claim_next("w1", lease_s=30)
    assert one is not None and one.generation == 1
    board.update_claimed(first, "w1", status=JobStatus.succeeded)
    two = board.claim_next("w1", lease_s=30)
    assert two is not None and two.id == second and two.generation == 2
    assert board.get(first).generation == 1  # a finished job keeps the generation it ran under


def test_a_held_claim_fences_a_publish_and_renews_its_lease(board: JobBoard, store: AdapterStore) -> None:
    (job_id,) = queue(board, "a")
    job = board.claim_next("w1", lease_s=0.5)
    assert job is not None
    time.sleep(0.3)
    fence = board.fence(job, lease_s=30)
    publication = store.publish("a", make_adapter(0), META, "concat", fence=fence)
    assert publication.task.id == "a/v1" and store.ledger()[0]["fence"] == job.generation
    lease = board.get(job_id).lease_expires_at
    assert lease is not None and lease > time.time() + 20  # renewed by the fence, not lapsing


def test_a_stalled_worker_cannot_publish_after_the_next_claim(board: JobBoard, store: AdapterStore) -> None:
    stalled_job, next_job = queue(board, "stalled", "next")
    stalled = board.claim_next("w1", lease_s=0.05)
    assert stalled is not None
    fence = board.fence(stalled, lease_s=0.05)
    time.sleep(0.1)  # w1 stops (SIGSTOP, a GC pause, a swap storm) past its lease
    following = board.claim_next("w2", lease_s=30)
    assert following is not None and following.id == next_job
    store.publish("next", make_adapter(1), META, "concat", fence=board.fence(following, lease_s=30))
    ledger, files = store.ledger(), visible_versions(store.root)

    with pytest.raises(FenceLost, match=f"generation {stalled.generation}"):
        store.publish("stalled", make_adapter(0), META, "concat", fence=fence)  # w1 wakes up
    assert store.ledger() == ledger and visible_versions(store.root) == files
    assert [t.name for t in store.tasks()] == ["next"]
    failed = board.get(stalled_job)
    assert failed.status == JobStatus.failed and failed.error is not None and failed.error.code == WORKER_LOST


def test_a_lapsed_lease_alone_refuses_the_publish(board: JobBoard, store: AdapterStore) -> None:
    """No other worker came: the fence itself notices the lapse and fails the job."""
    (job_id,) = queue(board, "a")
    job = board.claim_next("w1", lease_s=0.05)
    assert job is not None
    time.sleep(0.1)
    with pytest.raises(FenceLost):
        store.publish("a", make_adapter(0), META, "concat", fence=board.fence(job, lease_s=30))
    assert store.ledger() == [] and board.get(job_id).status == JobStatus.failed


def test_another_generation_of_the_same_worker_does_not_hold(board: JobBoard) -> None:
    (job_id,) = queue(board, "a")
    job = board.claim_next("w1", lease_s=30)
    assert job is not None and job.generation is not None
    assert board.holds(job_id, "w1", job.generation, lease_s=30)
    assert not board.holds(job_id, "w1", job.generation + 1, lease_s=30)
    assert not board.holds(job_id, "w2", job.generation, lease_s=30)


def test_with_a_database_the_claim_and_the_publish_commit_together(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fence is checked and the lease renewed inside the transaction that appends the ledger
    entries (as ``AdapterStore.publish`` asks the database ledger to): when that transaction fails
    after the check, the renewal is rolled back with it; when it commits, both land."""
    from adapters_store import ledger_database

    options = backend_options("database", request)
    ledger: ledger_database.DatabaseLedger = options["ledger"]
    board = JobBoard(records=DatabaseJobRecords(ledger.url, ledger.store))
    (job_id,) = queue(board, "a")
    job = board.claim_next("w1", lease_s=30)
    assert job is not None
    lease = board.get(job_id).lease_expires_at
    fence = board.fence(job, lease_s=600)

    def no_insert(entry: object) -> object:
        raise ConnectionError("the connection dropped mid-commit")

    monkeypatch.setattr(
        ledger_database, "Jsonb", no_insert
    )  # fails after the fence's check, in the transaction
    with pytest.raises(ConnectionError):
        ledger.append([{"op": "note"}], guard=lambda connection: check_fence(fence, "a", connection))
    assert ledger.read() == [] and board.get(job_id).lease_expires_at == lease  # the renewal went too
    monkeypatch.undo()
    ledger.append([{"op": "note"}], guard=lambda connection: check_fence(fence, "a", connection))
    renewed = board.get(job_id).lease_expires_at
    assert [e["op"] for e in ledger.read()] == ["note"]
    assert lease is not None and renewed is not None and renewed > lease + 500  # committed with the entry
