"""The logic behind the training API: validate a task completely, record the job, and send
it to the worker queue by name (this process never imports the training code)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from adapters_store.store import AdapterStore
from server.errors import APIError
from server.training.protocol import ExampleIn, TaskCreate
from trainer.contract.admission import AdmissionError, AdmissionReason, admit
from trainer.contract.backends import open_board
from trainer.contract.jobs import Job, JobNotFound, JobRefused, JobStatus
from trainer.contract.queue import TRAIN_TASK, make_celery
from trainer.contract.settings import LaminaSettings
from trainer.contract.tasks import Hyperparameters, UnknownMethodError, resolve_method

log = logging.getLogger(__name__)

# The trainer says why a task cannot join the store; what that is in HTTP is the server's call.
ADMISSION_STATUS: dict[AdmissionReason, int] = {
    AdmissionReason.invalid_name: 400,
    AdmissionReason.task_exists: 409,
    AdmissionReason.method_mismatch: 409,
    AdmissionReason.rank_exceeded: 409,
    AdmissionReason.capacity_exceeded: 409,
}


class TrainingService:
    def __init__(
        self,
        settings: LaminaSettings,
        store: AdapterStore,
        default_method: str,
        max_examples: int,
        reserved_names: tuple[str, ...] = (),
    ) -> None:
        self.max_examples = max_examples
        self.reserved_names = reserved_names  # model names the server answers for itself
        self.settings = settings
        self.store = store
        self.board = open_board(settings)
        self.celery = make_celery(settings)
        self.default_method = default_method
        # The task versions this replica serves now (set by the app to its sync's view); None: no
        # server here (tests of the API alone), jobs are shown as the board has them.
        self.served_here: Callable[[], list[str]] | None = None

    def seen_here(self, job: Job) -> Job:
        """The job as a client of this replica should see it: a job whose version the store made
        live but this replica does not serve yet (its sync follows the store within
        LAMINA_LEDGER_POLL_S, or it is retrying a failed one) is still ``running``. Why: a client
        polls until ``succeeded`` and then asks the model; it must never get a 404."""
        if self.served_here is None or job.status != JobStatus.succeeded or job.task_version is None:
            return job
        if job.task_version in self.served_here():
            return job
        if job.task_version not in {t.id for t in self.store.tasks()}:  # rolled back or removed since
            return job
        note = f"published as {job.task_version}; this server does not serve it yet (it follows the store)"
        return job.model_copy(
            update={"status": JobStatus.running, "finished_at": None, "warnings": [*job.warnings, note]}
        )

    def submit(self, request: TaskCreate) -> Job:
        for param, given in (
            ("examples", request.examples),
            ("validation_examples", request.validation_examples),
        ):
            if given is not None and len(given) > self.max_examples:
                raise APIError(
                    413,
                    f"{len(given)} {param}; a task may have at most {self.max_examples}.",
                    param=param,
                    code="too_many_examples",
                )
        if request.name in self.reserved_names:
            raise APIError(
                400,
                f"name {request.name!r} is reserved: it is one of the models the server always serves.",
                param="name",
                code="reserved_name",
            )
        method_name = request.method or self.default_method
        try:
            method = resolve_method(method_name)
        except UnknownMethodError as error:
            raise APIError(400, str(error), param="method", code="unknown_method") from None
        try:
            hp = Hyperparameters.model_validate(request.hyperparameters)
        except ValidationError as error:
            first = error.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            param = f"hyperparameters.{field}" if field else "hyperparameters"
            raise APIError(400, f"{param}: {first['msg']}", param=param, code="invalid_value") from None
        try:
            admit(
                self.store,
                request.name,
                method,
                hp,
                self.settings.max_lora_rank,
                self.settings.loraf_grow_rank,
            )
        except AdmissionError as error:
            raise admission_refused(error) from None
        examples = [e.to_example() for e in request.examples]
        self._require_queue()
        try:
            job = self.board.create(
                request.name,
                method.name,
                hp.model_dump(mode="json", exclude_unset=True),
                examples,
                max_pending=self.settings.max_pending_tasks,
                validation=[e.to_example() for e in request.validation_examples or []],
            )
        except JobRefused as refused:
            if refused.reason == "name_pending":
                raise APIError(
                    409,
                    f"a task named {request.name!r} is already queued or training.",
                    param="name",
                    code="task_exists",
                ) from None
            raise APIError(
                429,
                f"{refused.pending} tasks are already pending (limit {self.settings.max_pending_tasks}); "
                "retry when some have finished.",
                code="queue_full",
                type="rate_limit_error",
            ) from None
        try:
            self.celery.send_task(TRAIN_TASK, args=[job.id])
        except Exception:  # the queue went away since the check: take the job back
            log.exception("could not enqueue %s", job.id)
            if self.board.discard(job.id):
                raise _queue_unavailable() from None
            log.info("%s was claimed by a worker draining the board; it trains without its message", job.id)
        return job

    def _require_queue(self) -> None:
        """Refuse before anything is written when the task queue cannot be reached (one quick
        connection attempt, no retries): the server keeps serving, and POST /tasks works again
        as soon as the broker is back."""
        try:
            with self.celery.connection_for_write() as connection:
                connection.ensure_connection(max_retries=0)
        except Exception as error:
            log.warning("the task queue cannot be reached (%s); refusing a task", error)
            raise _queue_unavailable() from None

    def get(self, job_id: str) -> Job:
        try:
            return self.seen_here(self.board.current(job_id))
        except JobNotFound:
            raise APIError(404, f"no task job {job_id!r}", param="id", code="job_not_found") from None

    def list(self) -> list[Job]:
        return [self.seen_here(job) for job in self.board.fail_lapsed()]

    def cancel(self, job_id: str) -> Job:
        self.get(job_id)
        return self.seen_here(self.board.request_cancel(job_id))


def admission_refused(error: AdmissionError) -> APIError:
    """The API error for a refused task: the reason's status, the trainer's message and field."""
    return APIError(ADMISSION_STATUS[error.reason], error.message, param=error.param, code=error.code)


def _queue_unavailable() -> APIError:
    return APIError(
        503,
        "the task queue cannot be reached (is the broker, LAMINA_BROKER_URL, up?); nothing was queued "
        "and no job was recorded. Inference still works; retry the task later.",
        code="queue_unavailable",
        type="server_error",
    )


def parse_jsonl(content: bytes, param: str = "file") -> list[ExampleIn]:
    """Examples from an uploaded JSONL file (the form field ``param``), one object a line,
    ``{"prompt", "completion"}`` or ``{"messages": [...]}``; errors name the line and the field."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, f"{param}: not UTF-8 text", param=param) from None
    examples: list[ExampleIn] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data: Any = json.loads(line)
            examples.append(ExampleIn.model_validate(data))
        except ValidationError as error:
            raise APIError(400, f"{param} line {number}: {_first_error(error)}", param=param) from None
        except ValueError:
            raise APIError(400, f"{param} line {number}: not valid JSON", param=param) from None
    if not examples:
        raise APIError(400, f"{param}: no examples", param=param)
    return examples


def _first_error(error: ValidationError) -> str:
    """``messages.1.role: Input should be ...``: the first error, with its field path if any."""
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"])
    return f"{field}: {first['msg']}" if field else first["msg"]
