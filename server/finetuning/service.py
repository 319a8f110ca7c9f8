"""The logic behind ``/v1/files`` and ``/v1/fine_tuning/jobs``: files are kept in the store, a
fine-tuning job is a Lamina task submitted through the same ``TrainingService`` as
``POST /tasks`` (one job board, one queue), plus a small record of the OpenAI request in
``<store>/finetuning/jobs/`` (with ``LAMINA_DATABASE_URL`` set, rows in the database instead:
:mod:`server.finetuning.records_database`)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from fastapi import UploadFile
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from adapters_store.atomic import atomic_write
from server.errors import APIError
from server.finetuning.events import ProgressLog, ProgressPoints, job_events
from server.finetuning.files import Files, FileStore
from server.finetuning.mapping import lamina_job_id, openai_job_id, plan, to_openai, unix
from server.finetuning.protocol import (
    Checkpoint,
    CheckpointList,
    FileDeleted,
    FileList,
    FileObject,
    FineTuneRecord,
    FineTuningJob,
    FineTuningJobCreate,
    FineTuningJobEventList,
    FineTuningJobList,
)
from server.training.protocol import ExampleIn, TaskCreate
from server.training.service import TrainingService, parse_jsonl
from trainer.contract.board import checked_job_id
from trainer.contract.jobs import Job, JobNotFound, JobStatus

PURPOSE = "fine-tune"
UPLOAD_CHUNK = 1 << 20
# TrainingService names its own fields in errors; a fine-tuning client sent these instead.
_PARAMS = {"name": "suffix", "method": "metadata.lamina_method", "examples": "training_file"}

Item = TypeVar("Item", bound=BaseModel)


class FineTuneRecords(Protocol):
    """Where the OpenAI request of each job created through ``/v1/fine_tuning/jobs`` is kept:
    :class:`FileFineTuneRecords` or, across hosts, the database's
    :class:`server.finetuning.records_database.DatabaseFineTuneRecords`. A job id is checked
    (:func:`trainer.contract.board.checked_job_id`) before any path or query is built from it."""

    def put(self, record: FineTuneRecord) -> None: ...

    def get(self, job_id: str) -> FineTuneRecord | None:
        """The job's record; ``None`` when it has none (a job posted to ``/tasks``), its id is
        malformed, or what is kept does not read as a record."""
        ...

    def many(self, job_ids: Iterable[str]) -> dict[str, FineTuneRecord]:
        """The records of those of ``job_ids`` that have one (as :meth:`get`), by job id."""
        ...


def well_formed_job_id(job_id: str) -> bool:
    """Whether ``job_id`` has the board's shape: a malformed one reads as a job with no record."""
    try:
        checked_job_id(job_id)
    except JobNotFound:
        return False
    return True


class FileFineTuneRecords:
    """The records as ``<store>/finetuning/jobs/<job id>.json``, each written atomically."""

    def __init__(self, store_dir: Path) -> None:
        self.root = Path(store_dir) / "finetuning" / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, record: FineTuneRecord) -> None:
        atomic_write(self.root / f"{checked_job_id(record.job_id)}.json", record.model_dump_json().encode())

    def get(self, job_id: str) -> FineTuneRecord | None:
        if not well_formed_job_id(job_id):
            return None
        try:
            return FineTuneRecord.model_validate_json((self.root / f"{job_id}.json").read_bytes())
        except (FileNotFoundError, ValidationError):  # a job posted to /tasks
            return None

    def many(self, job_ids: Iterable[str]) -> dict[str, FineTuneRecord]:
        found = {job_id: self.get(job_id) for job_id in job_ids}
        return {job_id: record for job_id, record in found.items() if record is not None}


class FineTuningService:
    def __init__(
        self,
        training: TrainingService,
        store_dir: Path,
        base_names: set[str],
        base_name: str,
        default_method: str,
        max_file_bytes: int,
        files: Files | None = None,
        progress: ProgressPoints | None = None,
        records: FineTuneRecords | None = None,
    ) -> None:
        """``files``, ``progress`` and ``records``: where uploads, progress points and the jobs'
        OpenAI requests live (default: files under ``store_dir``;
        :func:`server.finetuning.backends.finetuning_backends` picks)."""
        self.training = training
        self.board = training.board
        self.files: Files = files if files is not None else FileStore(store_dir)
        self.progress: ProgressPoints = progress if progress is not None else ProgressLog(store_dir)
        self.records: FineTuneRecords = records if records is not None else FileFineTuneRecords(store_dir)
        self.base_names, self.base_name = base_names, base_name
        self.default_method = default_method
        self.max_file_bytes = max_file_bytes

    # --- files ------------------------------------------------------------------------------

    async def upload(self, upload: UploadFile, purpose: str) -> FileObject:
        if purpose != PURPOSE:
            raise APIError(
                400,
                f"purpose {purpose!r} is not supported: Lamina stores files for fine-tuning only "
                f"(purpose={PURPOSE!r}).",
                param="purpose",
                code="invalid_value",
            )
        content = bytearray()
        while chunk := await upload.read(UPLOAD_CHUNK):
            content += chunk
            if len(content) > self.max_file_bytes:
                raise APIError(
                    413,
                    f"file is larger than {self.max_file_bytes} bytes (LAMINA_MAX_FILE_BYTES).",
                    param="file",
                    code="file_too_large",
                )
        # parsing every line and writing the file are blocking work: off the event loop, so streams go on
        await run_in_threadpool(parse_jsonl, bytes(content))  # a 400 naming the line and the field
        return await run_in_threadpool(
            self.files.create, bytes(content), upload.filename or "upload.jsonl", purpose
        )

    def list_files(self, purpose: str | None, after: str | None, limit: int, order: str) -> FileList:
        files = [f for f in self.files.all() if purpose is None or f.purpose == purpose]
        if order == "asc":
            files.reverse()
        return FileList(**_page_with_ids(files, after, limit))

    def delete_file(self, file_id: str) -> FileDeleted:
        self.files.delete(file_id)
        return FileDeleted(id=file_id)

    # --- jobs -------------------------------------------------------------------------------

    def create(self, request: FineTuningJobCreate) -> FineTuningJob:
        planned = plan(request, self.base_names, self.default_method)
        examples = _examples(self.files, request.training_file, "training_file")
        validation = (
            _examples(self.files, request.validation_file, "validation_file")
            if request.validation_file is not None
            else None
        )
        task = TaskCreate.model_validate(
            {
                "name": planned.name,
                "method": planned.method,
                "examples": examples,
                "validation_examples": validation,
                "hyperparameters": planned.hyperparameters,
            }
        )
        try:
            job = self.training.submit(task)
        except APIError as error:
            error.param = _PARAMS.get(error.param or "", error.param)
            raise
        record = FineTuneRecord(
            job_id=job.id,
            model=request.model,
            training_file=request.training_file,
            validation_file=request.validation_file,
            suffix=request.suffix,
            seed=int(planned.hyperparameters.get("seed", 0)),
            metadata=request.metadata,
            hyperparameters=planned.requested,
        )
        self.records.put(record)
        return to_openai(job, record, self.base_name)

    def retrieve(self, ftjob_id: str) -> FineTuningJob:
        job = self._job(ftjob_id)
        return to_openai(job, self._record(job.id), self.base_name)

    def list_jobs(self, after: str | None, limit: int) -> FineTuningJobList:
        jobs = [self.training.seen_here(job) for job in reversed(self.board.fail_lapsed())]  # newest first
        for job in jobs:
            self.progress.observe(job)
        records = self.records.many(job.id for job in jobs)  # one read for the list, not one per job
        listed = [to_openai(job, records.get(job.id), self.base_name) for job in jobs]
        page, has_more = _page(listed, after, limit, "after")
        return FineTuningJobList(data=page, has_more=has_more)

    def cancel(self, ftjob_id: str) -> FineTuningJob:
        job = self._job(ftjob_id)
        job = self.training.seen_here(self.board.request_cancel(job.id))
        return to_openai(job, self._record(job.id), self.base_name)

    def events(self, ftjob_id: str, after: str | None, limit: int) -> FineTuningJobEventList:
        job = self._job(ftjob_id)
        events = job_events(job, self._record(job.id), self.progress.points(job.id))
        page, has_more = _page(events, after, limit, "after")
        return FineTuningJobEventList(data=page, has_more=has_more)

    def checkpoints(self, ftjob_id: str, after: str | None, limit: int) -> CheckpointList:
        """The published task version is the job's one checkpoint; none before it succeeds."""
        job = self._job(ftjob_id)
        found: list[Checkpoint] = []
        if job.status == JobStatus.succeeded and job.task_version is not None:
            step = int(job.progress.step if job.progress else job.metrics.get("steps", 0))
            metrics = {"step": float(step)}
            if "final_loss" in job.metrics:
                metrics["train_loss"] = float(job.metrics["final_loss"])
            found.append(
                Checkpoint(
                    id=f"ftckpt-{job.id.removeprefix('job-')}",
                    created_at=_unix_or_zero(job.finished_at),
                    fine_tuned_model_checkpoint=job.name,
                    fine_tuning_job_id=openai_job_id(job.id),
                    metrics=metrics,
                    step_number=step,
                )
            )
        return CheckpointList(**_page_with_ids(found, after, limit))

    def _job(self, ftjob_id: str) -> Job:
        job_id = lamina_job_id(ftjob_id)
        try:
            if job_id is None:
                raise JobNotFound(ftjob_id)
            job = self.training.seen_here(self.board.current(job_id))
        except JobNotFound:
            raise APIError(
                404,
                f"No such fine-tuning job: {ftjob_id}",
                param="fine_tuning_job_id",
                code="fine_tuning_job_not_found",
                type="not_found_error",
            ) from None
        self.progress.observe(job)
        return job

    def _record(self, job_id: str) -> FineTuneRecord | None:
        return self.records.get(job_id)  # None for a job posted to /tasks


def _page(items: list[Item], after: str | None, limit: int, param: str) -> tuple[list[Item], bool]:
    """OpenAI's cursor pages: the ``limit`` items that follow the one whose id is ``after``."""
    start = 0
    if after is not None:
        ids = [getattr(item, "id") for item in items]  # noqa: B009 - every listed model has an id
        if after not in ids:
            raise APIError(
                400, f"{param} {after!r} is not an id in this list.", param=param, code="invalid_value"
            )
        start = ids.index(after) + 1
    page = items[start : start + limit]
    return page, start + limit < len(items)


def _page_with_ids(items: list[Item], after: str | None, limit: int) -> dict[str, Any]:
    """A cursor page with the ``first_id`` and ``last_id`` that the file and checkpoint lists carry."""
    page, has_more = _page(items, after, limit, "after")
    first_id, last_id = (getattr(page[0], "id"), getattr(page[-1], "id")) if page else (None, None)  # noqa: B009
    return {"data": page, "has_more": has_more, "first_id": first_id, "last_id": last_id}


def _unix_or_zero(timestamp: str | None) -> int:
    return unix(timestamp) or 0


def _examples(files: Files, file_id: str, param: str) -> list[ExampleIn]:
    """A stored file's examples (checked at upload; checked again, naming ``param``)."""
    try:
        return parse_jsonl(files.content(file_id, param))
    except APIError as error:
        if error.message.startswith("file"):  # "file line 3: ..." from parse_jsonl
            error.message = f"{param} {file_id}{error.message[4:]}"
        error.param = param
        raise
