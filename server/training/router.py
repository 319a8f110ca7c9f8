"""HTTP routes of the training API: ``POST /tasks`` (a JSON body, or a multipart upload of a
JSONL file), ``GET /tasks``, ``GET /tasks/{id}``, ``POST /tasks/{id}/cancel``."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from pydantic.json_schema import models_json_schema
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
        examples = parse_jsonl(await upload.read())
        data = {
            "name": form.get("name"),
            "method": form.get("method") or None,
            "examples": [e.model_dump() for e in examples],
            "hyperparameters": hyperparameters,
        }
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
    """Queue a task to learn. Answers 202 with the job; follow it with GET /tasks/{id}."""
    return PublicJob.of(_service(request).submit(await _read_body(request)))


@router.get("/tasks", response_model=JobList)
async def list_tasks(request: Request) -> JobList:
    return JobList(data=[PublicJob.of(job) for job in _service(request).list()])


@router.get("/tasks/{job_id}", response_model=PublicJob)
async def get_task(job_id: str, request: Request) -> PublicJob:
    return PublicJob.of(_service(request).get(job_id))


@router.post("/tasks/{job_id}/cancel", response_model=PublicJob)
async def cancel_task(job_id: str, request: Request) -> PublicJob:
    return PublicJob.of(_service(request).cancel(job_id))
