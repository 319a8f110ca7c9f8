"""HTTP routes of OpenAI's files and fine-tuning API (``/v1/files``, ``/v1/fine_tuning/jobs``);
the logic is in ``FineTuningService`` on ``app.state.finetuning``."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import Response

from server.finetuning.protocol import (
    CheckpointList,
    FileDeleted,
    FileList,
    FileObject,
    FineTuningJob,
    FineTuningJobCreate,
    FineTuningJobEventList,
    FineTuningJobList,
)
from server.finetuning.service import FineTuningService

router = APIRouter(prefix="/v1", tags=["fine-tuning"])
Limit = Annotated[int, Query(ge=1, le=10_000)]


def _service(request: Request) -> FineTuningService:
    return request.app.state.finetuning


@router.post("/files", response_model=FileObject)
async def create_file(
    request: Request,
    file: Annotated[UploadFile, File(description="JSONL: {prompt, completion} or {messages} a line.")],
    purpose: Annotated[str, Form(description='"fine-tune" (the only purpose Lamina stores).')],
) -> FileObject:
    """Upload a training file; every line is checked, a bad one is a 400 naming it."""
    return await _service(request).upload(file, purpose)


@router.get("/files", response_model=FileList)
def list_files(
    request: Request,
    purpose: str | None = None,
    after: str | None = None,
    limit: Limit = 10_000,
    order: Literal["asc", "desc"] = "desc",
) -> FileList:
    return _service(request).list_files(purpose, after, limit, order)


@router.get("/files/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, request: Request) -> FileObject:
    return _service(request).files.get(file_id)


@router.delete("/files/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, request: Request) -> FileDeleted:
    return _service(request).delete_file(file_id)


@router.get(
    "/files/{file_id}/content",
    response_class=Response,
    responses={200: {"content": {"application/jsonl": {}}}},
)
def file_content(file_id: str, request: Request) -> Response:
    return Response(_service(request).files.content(file_id), media_type="application/jsonl")


@router.post("/fine_tuning/jobs", response_model=FineTuningJob)
def create_job(body: FineTuningJobCreate, request: Request) -> FineTuningJob:
    """Queue the training file as a Lamina task (the same board as POST /tasks)."""
    return _service(request).create(body)


@router.get("/fine_tuning/jobs", response_model=FineTuningJobList)
def list_jobs(request: Request, after: str | None = None, limit: Limit = 20) -> FineTuningJobList:
    """Every job of the board, newest first, those posted to /tasks included."""
    return _service(request).list_jobs(after, limit)


@router.get("/fine_tuning/jobs/{fine_tuning_job_id}", response_model=FineTuningJob)
def retrieve_job(fine_tuning_job_id: str, request: Request) -> FineTuningJob:
    return _service(request).retrieve(fine_tuning_job_id)


@router.post("/fine_tuning/jobs/{fine_tuning_job_id}/cancel", response_model=FineTuningJob)
def cancel_job(fine_tuning_job_id: str, request: Request) -> FineTuningJob:
    """A queued job is cancelled at once; a training one stops at its next step."""
    return _service(request).cancel(fine_tuning_job_id)


@router.get("/fine_tuning/jobs/{fine_tuning_job_id}/events", response_model=FineTuningJobEventList)
def list_events(
    fine_tuning_job_id: str, request: Request, after: str | None = None, limit: Limit = 20
) -> FineTuningJobEventList:
    return _service(request).events(fine_tuning_job_id, after, limit)


@router.get("/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints", response_model=CheckpointList)
def list_checkpoints(
    fine_tuning_job_id: str, request: Request, after: str | None = None, limit: Limit = 10
) -> CheckpointList:
    return _service(request).checkpoints(fine_tuning_job_id, after, limit)
