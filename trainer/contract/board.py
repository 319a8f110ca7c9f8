"""Training jobs: what ``POST /tasks`` created and how far the worker has got.

:class:`JobBoard` holds the rules (arrival numbers, refusals, claims with leases and fencing
generations); where the jobs are kept is a :class:`JobRecords` backend's business, so the rules
are written once for every backend. By default (:class:`FileJobRecords`) jobs live as small
JSON files next to the adapter store (``<store>/jobs/``), so every server replica and every
worker that shares the store sees the same jobs with no extra service; each file is replaced
atomically under a lock, because two processes write it: the worker (progress, status) and the
API (cancellation). :mod:`trainer.contract.board_database` keeps them in PostgreSQL instead.
Part of the server↔trainer contract; imports nothing heavy. The job model itself is
:mod:`trainer.contract.jobs`.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from adapters_store.atomic import atomic_write, locked_file
from trainer.config import ChatExample, ChatMessage, Example, TrainingExample
from trainer.contract.jobs import Job, JobError, JobNotFound, JobRefused, JobStatus, Progress, PublicJob

# The job model is the contract's (the API returns it); the trainer's code also finds it here.
__all__ = [
    "CLAIMED",
    "DISK_FULL",
    "STORE_CHANGED",
    "WOULD_FORGET",
    "WORKER_LOST",
    "ClaimFence",
    "ExampleKind",
    "FileJobRecords",
    "Job",
    "JobBoard",
    "JobError",
    "JobNotFound",
    "JobRecords",
    "JobRefused",
    "JobStatus",
    "Progress",
    "PublicJob",
    "checked_job_id",
    "now",
]


# A job in one of these states belongs to the worker named in it, for as long as its lease holds.
CLAIMED = (JobStatus.validating, JobStatus.running)
WORKER_LOST = "worker_lost"
DISK_FULL = "disk_full"
WOULD_FORGET = "would_forget"  # the candidate scored an earlier task too low (trainer.regression)
STORE_CHANGED = "store_changed"  # an admin action changed the live tasks while the job trained, twice


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


ExampleKind = Literal["examples", "validation"]
EXAMPLE_KINDS: tuple[ExampleKind, ...] = ("examples", "validation")


def checked_job_id(job_id: str) -> str:
    """``job_id`` if it has the board's shape (``job-`` and letters or digits), else
    :class:`JobNotFound`: an id comes from a URL, so a hostile one must read as an unknown job
    in every backend, never as a path outside ``jobs/`` or a database error."""
    if not job_id.startswith("job-") or not job_id[4:].isalnum():
        raise JobNotFound(job_id)
    return job_id


class JobRecords(Protocol):
    """Where a board keeps its jobs and their examples. The board's rules need only these calls,
    plus :meth:`locked`: one critical section across every process sharing the records, inside
    which the board reads, decides and writes (a read-modify-write that must not interleave)."""

    def locked(self, connection: object | None = None) -> AbstractContextManager[None]:
        """The critical section; ``connection`` is a database transaction to join (the ledger
        append's, when the claim is checked there), which backends without one ignore."""
        ...

    def write(self, job: Job) -> None: ...

    def get(self, job_id: str) -> Job:
        """The job; :class:`JobNotFound` when there is none (or the id is malformed)."""
        ...

    def all(self) -> list[Job]:
        """Every job, in arrival order (``seq``)."""
        ...

    def delete(self, job_id: str) -> None: ...

    def put_examples(self, job_id: str, kind: ExampleKind, body: str) -> None:
        """Store a job's examples (``kind`` "examples") or validation examples as JSON lines."""
        ...

    def examples(self, job_id: str, kind: ExampleKind) -> str | None:
        """The JSON lines :meth:`put_examples` stored, or None when there are none."""
        ...

    def delete_examples(self, job_id: str) -> None: ...


class FileJobRecords:
    """Jobs as JSON files in ``<store>/jobs/`` (``job-*.json``, with ``*.examples.jsonl`` and
    ``*.validation.jsonl`` beside them), locked with ``flock`` on ``jobs/.lock``: needs nothing
    but the directory every process already shares with the store."""

    def __init__(self, store_dir: Path) -> None:
        self.root = Path(store_dir) / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, job_id: str) -> Path:
        return self.root / f"{checked_job_id(job_id)}.json"

    def _examples_path(self, job_id: str, kind: ExampleKind) -> Path:
        if kind not in EXAMPLE_KINDS:
            raise ValueError(f"unknown kind of examples: {kind!r}")
        return self.root / f"{checked_job_id(job_id)}.{kind}.jsonl"

    def locked(self, connection: object | None = None) -> AbstractContextManager[None]:
        return locked_file(self.root / ".lock")

    def write(self, job: Job) -> None:
        atomic_write(self._path(job.id), job.model_dump_json(indent=1))

    def get(self, job_id: str) -> Job:
        path = self._path(job_id)
        try:
            return Job.model_validate_json(path.read_text())
        except FileNotFoundError:
            raise JobNotFound(job_id) from None

    def all(self) -> list[Job]:
        jobs = []
        for path in self.root.glob("job-*.json"):
            try:
                jobs.append(Job.model_validate_json(path.read_text()))
            except (OSError, ValueError):  # vanished or being replaced: skip this round
                continue
        return sorted(jobs, key=lambda j: j.seq)

    def delete(self, job_id: str) -> None:
        self._path(job_id).unlink(missing_ok=True)

    def put_examples(self, job_id: str, kind: ExampleKind, body: str) -> None:
        atomic_write(self._examples_path(job_id, kind), body)

    def examples(self, job_id: str, kind: ExampleKind) -> str | None:
        try:
            return self._examples_path(job_id, kind).read_text()
        except FileNotFoundError:
            return None

    def delete_examples(self, job_id: str) -> None:
        for kind in EXAMPLE_KINDS:
            self._examples_path(job_id, kind).unlink(missing_ok=True)


class JobBoard:
    """All jobs of one store, kept by ``records`` (by default, files in ``<store_dir>/jobs/``)."""

    def __init__(self, store_dir: Path | None = None, *, records: JobRecords | None = None) -> None:
        if records is None:
            if store_dir is None:
                raise TypeError("JobBoard needs a store directory or records=")
            records = FileJobRecords(store_dir)
        elif store_dir is not None:
            raise TypeError("JobBoard takes a store directory or records=, not both")
        self.records: JobRecords = records

    @property
    def root(self) -> Path:
        """The file backend's ``jobs/`` directory (for tests that look at the files)."""
        if not isinstance(self.records, FileJobRecords):
            raise AttributeError(f"a board kept in {type(self.records).__name__} has no directory")
        return self.records.root

    def _locked(self) -> AbstractContextManager[None]:
        return self.records.locked()

    def _write(self, job: Job) -> None:
        self.records.write(job)

    # --- operations -----------------------------------------------------------------------

    def create(
        self,
        name: str,
        method: str,
        hyperparameters: dict[str, Any],
        examples: list[TrainingExample],
        max_pending: int | None = None,
        validation: list[TrainingExample] | None = None,
    ) -> Job:
        """Record a queued job with its examples (and the user's ``validation`` examples, the
        set the task is scored on at every later publish); the examples are written first, so a
        visible job always has its data. Under the board's lock, so that concurrent submissions
        get distinct arrival numbers and neither two jobs of one name nor more than
        ``max_pending`` unfinished jobs are ever recorded (:class:`JobRefused`)."""
        job_id = f"job-{uuid.uuid4().hex[:20]}"
        self.records.put_examples(job_id, "examples", _jsonl(examples))
        if validation:
            self.records.put_examples(job_id, "validation", _jsonl(validation))
        try:
            with self._locked():
                jobs = self._fail_lapsed(self.all())
                pending = [j for j in jobs if not j.status.terminal]
                if any(j.name == name for j in pending):
                    raise JobRefused("name_pending", len(pending))
                if max_pending is not None and len(pending) >= max_pending:
                    raise JobRefused("queue_full", len(pending))
                job = Job(
                    id=job_id,
                    name=name,
                    method=method,
                    seq=1 + max((j.seq for j in jobs), default=0),
                    created_at=now(),
                    n_examples=len(examples),
                    n_validation_examples=len(validation or []),
                    hyperparameters=hyperparameters,
                )
                self._write(job)
        except JobRefused:
            self.records.delete_examples(job_id)
            raise
        return job

    def get(self, job_id: str) -> Job:
        return self.records.get(job_id)

    def all(self) -> list[Job]:
        return self.records.all()

    def examples(self, job_id: str) -> list[TrainingExample]:
        body = self.records.examples(job_id, "examples")
        if body is None:
            raise JobNotFound(job_id)
        return _parse_jsonl(body)

    def validation_examples(self, job_id: str) -> list[TrainingExample]:
        """The user's validation examples; empty when the job was posted without any."""
        return _parse_jsonl(self.records.examples(job_id, "validation") or "")

    def update(self, job_id: str, **changes: Any) -> Job:
        """Read-modify-write one job under the board's lock."""
        with self._locked():
            job = Job.model_validate({**self.get(job_id).model_dump(), **changes})  # validates the changes
            self._write(job)
            return job

    def discard(self, job_id: str) -> bool:
        """Remove a job whose queue message could not be sent, so that the board holds no job
        that waits for a message no worker receives. Under the lock and only while the job is
        still queued: False when a worker draining the board claimed it meanwhile (it trains)."""
        with self._locked():
            try:
                if self.get(job_id).status != JobStatus.queued:
                    return False
            except JobNotFound:
                return True
            self.records.delete(job_id)
            self.records.delete_examples(job_id)
            return True

    def request_cancel(self, job_id: str) -> Job:
        """Queued jobs are cancelled at once; running ones are asked to stop at the next step
        (the worker then marks them cancelled). Finished jobs are returned unchanged."""
        with self._locked():
            job = self.get(job_id)
            if job.status == JobStatus.queued:
                job = job.model_copy(update={"status": JobStatus.cancelled, "finished_at": now()})
            elif not job.status.terminal:
                job = job.model_copy(update={"cancel_requested": True})
            self._write(job)
            return job

    # --- claims: which worker trains what ------------------------------------------------

    def claim_next(self, worker: str, lease_s: float) -> Job | None:
        """Give ``worker`` the earliest queued job, or None when none is queued or another
        worker's claim still holds: tasks of one store train one at a time, in arrival order.
        Lapsed claims are failed first, so a dead worker never blocks the queue for longer
        than its lease."""
        with self._locked():
            jobs = self._fail_lapsed(self.all())
            if any(j.status in CLAIMED for j in jobs):
                return None
            queued = [j for j in jobs if j.status == JobStatus.queued]
            if not queued:
                return None
            job = queued[0].model_copy(
                update={
                    "status": JobStatus.validating,
                    "started_at": now(),
                    "worker": worker,
                    "lease_expires_at": time.time() + lease_s,
                    "generation": 1 + max((j.generation or 0 for j in jobs), default=0),
                }
            )
            self._write(job)
            return job

    def renew(self, job_id: str, worker: str, lease_s: float) -> bool:
        """Extend ``worker``'s claim on the job; False once the claim is gone (the job finished
        or was failed as lapsed), which tells that worker to stop and publish nothing."""
        return self.update_claimed(job_id, worker, lease_expires_at=time.time() + lease_s) is not None

    def holds(
        self, job_id: str, worker: str, generation: int, lease_s: float, connection: object | None = None
    ) -> bool:
        """Whether ``worker``'s claim of ``generation`` on the job still holds; if it does, the
        lease is renewed, so the publish that asked has a whole lease to append its ledger
        lines. A lapsed lease fails the job here (as everywhere on the board) and answers False.
        ``connection``: a database transaction to do it in (the ledger append's), for records
        that can join one; others ignore it."""
        with self.records.locked(connection) if connection is not None else self._locked():
            job = self._fail_lapsed([self.get(job_id)])[0]
            if job.status not in CLAIMED or job.worker != worker or job.generation != generation:
                return False
            self._write(job.model_copy(update={"lease_expires_at": time.time() + lease_s}))
            return True

    def fence(self, job: Job, lease_s: float) -> ClaimFence:
        """The fence a worker hands the store's publish for the job it claimed."""
        assert job.worker is not None and job.generation is not None, "only a claimed job has a fence"
        return ClaimFence(self, job.id, job.worker, job.generation, lease_s)

    def update_claimed(self, job_id: str, worker: str, **changes: Any) -> Job | None:
        """Apply ``changes`` to a job ``worker`` still holds (a terminal status also stamps
        ``finished_at``). Writes nothing and returns None once the claim is lost, so a worker
        that stalled past its lease cannot overwrite what the board decided meanwhile."""
        with self._locked():
            job = self.get(job_id)
            if job.status not in CLAIMED or job.worker != worker:
                return None
            job = Job.model_validate({**job.model_dump(), **changes})
            if job.status.terminal:
                job = job.model_copy(update={"finished_at": now()})
            self._write(job)
            return job

    def current(self, job_id: str) -> Job:
        """One job as it stands now: failed first if its worker's claim lapsed, so a job whose
        worker died reads as failed even when no worker is left to notice."""
        with self._locked():
            return self._fail_lapsed([self.get(job_id)])[0]

    def fail_lapsed(self) -> list[Job]:
        """Fail every claimed job whose lease lapsed; returns all jobs as they are now."""
        with self._locked():
            return self._fail_lapsed(self.all())

    def _fail_lapsed(self, jobs: list[Job]) -> list[Job]:
        current = []
        for job in jobs:
            if job.status in CLAIMED and (job.lease_expires_at or 0.0) < time.time():
                job = job.model_copy(
                    update={
                        "status": JobStatus.failed,
                        "finished_at": now(),
                        "error": JobError(
                            message=f"the worker training this task ({job.worker}) stopped before "
                            "publishing it; nothing was published and the live model is unchanged. "
                            "Submit the task again to retry.",
                            code=WORKER_LOST,
                        ),
                    }
                )
                self._write(job)
            current.append(job)
        return current


@dataclass(frozen=True)
class ClaimFence:
    """A worker's claim as the store's fence (:class:`adapters_store.interface.Fence`): the
    store calls :meth:`holds` under its writer lock just before it appends the ledger lines, so
    a worker that stalled past its lease (and whose job the board has failed or given to the
    next claim) publishes nothing even if it wakes up in the middle of publishing."""

    board: JobBoard
    job_id: str
    worker: str
    token: int  # the claim's generation
    lease_s: float

    def holds(self) -> bool:
        return self.board.holds(self.job_id, self.worker, self.token, self.lease_s)

    def holds_in(self, connection: object) -> bool:
        """:meth:`holds`, in the database transaction that appends the publish's ledger entries,
        so the claim's renewal and the publish commit together (a board in the same database)."""
        return self.board.holds(self.job_id, self.worker, self.token, self.lease_s, connection)


def example_from_json(data: dict[str, Any]) -> TrainingExample:
    """One line of a job's examples file (``asdict`` of the example) back as the trainer's type."""
    if "messages" in data:
        return ChatExample(messages=tuple(ChatMessage(**message) for message in data["messages"]))
    return Example(**data)


def _jsonl(examples: list[TrainingExample]) -> str:
    return "".join(json.dumps(asdict(example)) + "\n" for example in examples)


def _parse_jsonl(body: str) -> list[TrainingExample]:
    return [example_from_json(json.loads(line)) for line in body.splitlines() if line.strip()]
