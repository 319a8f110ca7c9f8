"""HTTP routes of the training API.

A user posts a *task* (a name and examples: something to learn) and gets back a *job* (one
attempt to learn it, with an id, a status and progress). The URLs say which they take:

- ``POST /tasks``: a JSON body, or a multipart upload of a JSONL file; answers with the job;
- ``GET /jobs``, ``GET /jobs/{job_id}``, ``POST /jobs/{job_id}/cancel``: follow or stop jobs.

``GET /tasks``, ``GET /tasks/{job_id}`` and ``POST /tasks/{job_id}/cancel``, the names these had
before, keep working (marked deprecated in the OpenAPI schema): they took a job id under a URL
that reads like a task, while ``DELETE /admin/tasks/{name}`` takes a task's name.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from server.errors import APIError
from server.training.protocol import JobList, TaskCreate
from server.training.service import TrainingService, parse_jsonl
from trainer.contract.jobs import PublicJob

router = APIRouter(tags=["training"])

_UPLOAD_SCHEMA = {
    "type": "object",
    "required": ["file", "name"],
    "properties": {
        "file": {
            "type": "string",
            "format": "binary",
            "description": "JSONL: one {prompt, completion} a line.",
        },
        "name": {"type": "string"},
        "method": {"type": "string"},
        "hyperparameters": {"type": "string", "description": "A JSON object."},
        "validation_file": {
            "type": "string",
            "format": "binary",
            "description": "JSONL like `file`: the task's own evaluation set (see TaskCreate.validation_examples).",
        },
    },
}
_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/TaskCreate"}},
            "multipart/form-data": {"schema": _UPLOAD_SCHEMA},
        },
    }
}


def document_task_schema(app: FastAPI) -> None:
    """``POST /tasks`` reads its body by hand (two encodings), so FastAPI never sees
    ``TaskCreate``; add it, and the models it references, to the OpenAPI components that the
    route's ``$ref`` points at."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            _, definitions = models_json_schema(
                [(TaskCreate, "validation")], ref_template="#/components/schemas/{model}"
            )
            document.setdefault("components", {}).setdefault("schemas", {}).update(definitions["$defs"])
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def _service(request: Request) -> TrainingService:
    return request.app.state.training


async def _read_body(request: Request) -> TaskCreate:
    """One route, two encodings: JSON with inline examples, or a form with a JSONL file."""
    data: Any
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise APIError(400, "file: a JSONL file is required", param="file")
        try:
            hyperparameters = json.loads(str(form.get("hyperparameters") or "{}"))
        except ValueError:
            raise APIError(400, "hyperparameters must be a JSON object", param="hyperparameters") from None
        examples = await run_in_threadpool(parse_jsonl, await upload.read())
        validation = form.get("validation_file")
        data = {
            "name": form.get("name"),
            "method": form.get("method") or None,
            "examples": [e.model_dump() for e in examples],
            "hyperparameters": hyperparameters,
        }
        if isinstance(validation, UploadFile):
            held = await run_in_threadpool(parse_jsonl, await validation.read(), "validation_file")
            data["validation_examples"] = [e.model_dump() for e in held]
    else:
        try:
            data = await request.json()
        except ValueError:
            raise APIError(400, "the body is not valid JSON", param="body") from None
    try:
        return TaskCreate.model_validate(data)
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from None


@router.post("/tasks", status_code=202, response_model=PublicJob, openapi_extra=_BODY)
async def create_task(request: Request) -> PublicJob:
    """Queue a task to learn. Answers 202 with its job; follow it with ``GET /jobs/{id}``."""
    body = await _read_body(request)
    # hashing, the board's file lock and the broker call block: off the event loop, so streams go on
    return PublicJob.of(await run_in_threadpool(_service(request).submit, body))


@router.get("/jobs", response_model=JobList)
def list_jobs(request: Request) -> JobList:
    """Every job, oldest first."""
    return JobList(data=[PublicJob.of(job) for job in _service(request).list()])


@router.get("/jobs/{job_id}", response_model=PublicJob)
def get_job(job_id: str, request: Request) -> PublicJob:
    """One job: status, progress, metrics, warnings, the error that ended it."""
    return PublicJob.of(_service(request).get(job_id))


@router.post("/jobs/{job_id}/cancel", response_model=PublicJob)
def cancel_job(job_id: str, request: Request) -> PublicJob:
    """Stop a queued or running job; it publishes nothing."""
    return PublicJob.of(_service(request).cancel(job_id))


# The same routes under their earlier names (module docstring).
router.add_api_route("/tasks", list_jobs, methods=["GET"], response_model=JobList, deprecated=True)
router.add_api_route("/tasks/{job_id}", get_job, methods=["GET"], response_model=PublicJob, deprecated=True)
router.add_api_route(
    "/tasks/{job_id}/cancel", cancel_job, methods=["POST"], response_model=PublicJob, deprecated=True
)
