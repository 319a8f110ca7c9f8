"""How OpenAI's fine-tuning API maps onto Lamina's job board, as pure functions.

- ``model`` must be the served base model's id (``base``): a task always trains on the base
  model plus the store's earlier tasks.
- ``suffix`` is the task's name, and so the ``fine_tuned_model`` the completions accept;
  default ``ft-`` + the first 12 hex digits of the training file's id.
- ``method.type`` must be ``supervised``. Lamina's anti-forgetting preset comes from
  ``metadata["lamina_method"]`` (``inflora``, ``lori-s``, ...), default the server's default
  method (``inflora``).
- ``n_epochs`` → ``epochs``, ``batch_size`` → ``batch_size``, ``learning_rate_multiplier`` →
  ``learning_rate`` = multiplier × the rate ``trainer.auto`` picks for the preset; ``"auto"``
  leaves the value to ``trainer.auto`` (including its extra steps while the loss is high).
  ``seed`` → ``seed``.
- Statuses: Lamina's ``queued`` → ``queued``, ``validating`` (a worker took the job and is
  checking it against the store) → ``validating_files``, ``running``, ``succeeded``,
  ``failed``, ``cancelled`` unchanged. The server checks the files before a job is queued, so a
  job reads ``queued`` before ``validating_files``, not after as on OpenAI.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from adapters_store.store import InvalidTaskName, check_task_name
from server.errors import APIError
from server.finetuning.protocol import (
    AUTO,
    FineTuneRecord,
    FineTuningJob,
    FineTuningJobCreate,
    FineTuningStatus,
    Hyperparameters,
    JobErrorOut,
    MethodOut,
    SupervisedOut,
)
from trainer.contract.jobs import Job, JobStatus
from trainer.contract.tasks import Hyperparameters as LaminaHyperparameters
from trainer.contract.tasks import UnknownMethodError, resolve_auto, resolve_method

METHOD_KEY = "lamina_method"
STATUS: dict[JobStatus, FineTuningStatus] = {
    JobStatus.queued: "queued",
    JobStatus.validating: "validating_files",
    JobStatus.running: "running",
    JobStatus.succeeded: "succeeded",
    JobStatus.failed: "failed",
    JobStatus.cancelled: "cancelled",
}
_FTJOB = re.compile(r"ftjob-([a-z0-9]{1,64})")


@dataclass(frozen=True)
class Plan:
    """A fine-tuning request as a Lamina task."""

    name: str
    method: str
    hyperparameters: dict[str, Any]  # Lamina's, as POST /tasks takes them
    requested: Hyperparameters  # OpenAI's, as asked


def plan(request: FineTuningJobCreate, base_names: set[str], default_method: str) -> Plan:
    """The Lamina task a fine-tuning request asks for; :class:`APIError` naming the OpenAI field
    otherwise."""
    if request.model not in base_names:
        raise APIError(
            400,
            f"model {request.model!r} cannot be fine-tuned here: a task trains on the base model, "
            f"model must be one of {sorted(base_names)}.",
            param="model",
            code="model_not_available",
        )
    if request.integrations:
        raise APIError(400, "integrations are not supported.", param="integrations", code="invalid_value")
    method_type = request.method.type if request.method else "supervised"
    if method_type != "supervised":
        raise APIError(
            400,
            f"method.type {method_type!r} is not supported: Lamina trains supervised tasks only.",
            param="method.type",
            code="invalid_value",
        )
    supervised = request.method.supervised if request.method else None
    if supervised is not None and request.hyperparameters is not None:
        raise APIError(
            400,
            "give hyper-parameters in method.supervised.hyperparameters or in hyperparameters, not both.",
            param="hyperparameters",
            code="invalid_value",
        )
    requested = (supervised.hyperparameters if supervised else request.hyperparameters) or Hyperparameters()
    preset = (request.metadata or {}).get(METHOD_KEY) or default_method
    try:
        method = resolve_method(preset)
    except UnknownMethodError as error:
        raise APIError(400, str(error), param=f"metadata.{METHOD_KEY}", code="unknown_method") from None
    name = request.suffix if request.suffix is not None else default_name(request.training_file)
    try:
        check_task_name(name)
    except InvalidTaskName:
        raise APIError(
            400,
            f"suffix {name!r} must match [a-z0-9][a-z0-9_-]{{0,63}}: it becomes the task's name and model id.",
            param="suffix",
            code="invalid_value",
        ) from None
    hp: dict[str, Any] = {}
    if request.seed is not None:
        hp["seed"] = request.seed
    if requested.n_epochs != AUTO:
        hp["epochs"] = requested.n_epochs
    if requested.batch_size != AUTO:
        hp["batch_size"] = requested.batch_size
    if requested.learning_rate_multiplier != AUTO:
        rate = float(requested.learning_rate_multiplier) * auto_learning_rate(method.name, hp)
        if rate > 1.0:
            raise APIError(
                400,
                f"learning_rate_multiplier {requested.learning_rate_multiplier} gives a learning rate of "
                f"{rate:g}, above 1.",
                param="hyperparameters.learning_rate_multiplier",
                code="invalid_value",
            )
        hp["learning_rate"] = rate
    return Plan(name=name, method=method.name, hyperparameters=hp, requested=requested)


def default_name(training_file: str) -> str:
    return f"ft-{training_file.removeprefix('file-')[:12].lower()}"


def auto_learning_rate(method_name: str, hyperparameters: dict[str, Any]) -> float:
    """The rate ``trainer.auto`` picks for this preset and these hyper-parameters (it depends on
    the method's parametrization and the share of B it trains, not on the examples)."""
    fixed = {k: v for k, v in hyperparameters.items() if k not in ("learning_rate", "steps", "epochs")}
    try:
        hp = LaminaHyperparameters.model_validate(fixed)
    except ValidationError:  # a /tasks job's hyper-parameters were valid when posted
        hp = LaminaHyperparameters()
    resolved, _ = resolve_auto(hp, resolve_method(method_name), 1)
    assert resolved.learning_rate is not None
    return resolved.learning_rate


def openai_job_id(job_id: str) -> str:
    return f"ftjob-{job_id.removeprefix('job-')}"


def lamina_job_id(ftjob_id: str) -> str | None:
    """``ftjob-<x>`` → ``job-<x>``; None for anything else (answered 404)."""
    match = _FTJOB.fullmatch(ftjob_id)
    return f"job-{match.group(1)}" if match else None


def unix(timestamp: str | None) -> int | None:
    return None if timestamp is None else int(datetime.fromisoformat(timestamp).timestamp())


def trained_hyperparameters(job: Job) -> Hyperparameters:
    """OpenAI's view of what the job trained with (succeeded jobs: every auto value resolved)."""
    hp = job.hyperparameters
    batch = hp.get("batch_size")
    examples = job.metrics.get("examples")
    epochs: int | None = hp.get("epochs")
    if epochs is None and batch and examples and hp.get("steps"):
        epochs = max(1, round(int(hp["steps"]) / math.ceil(int(examples) / int(batch))))
    rate = hp.get("learning_rate")
    multiplier = round(rate / auto_learning_rate(job.method, hp), 6) if rate is not None else None
    return Hyperparameters(
        n_epochs=epochs if epochs is not None else AUTO,
        batch_size=batch if batch is not None else AUTO,
        learning_rate_multiplier=multiplier if multiplier is not None else AUTO,
    )


def to_openai(job: Job, record: FineTuneRecord | None, base_name: str) -> FineTuningJob:
    """A board job as OpenAI's fine-tuning job. Jobs posted to /tasks have no record: their
    training_file is None and their hyper-parameters are read from the board."""
    succeeded = job.status == JobStatus.succeeded
    requested = record.hyperparameters if record is not None and not succeeded else None
    hyperparameters = requested or trained_hyperparameters(job)
    error = None
    if job.error is not None:
        error = JobErrorOut(
            code=job.error.code or "training_failed", message=job.error.message, param=job.error.param
        )
    tokens = job.metrics.get("completion_tokens") if succeeded else None
    return FineTuningJob(
        id=openai_job_id(job.id),
        created_at=unix(job.created_at) or 0,
        error=error,
        fine_tuned_model=job.name if succeeded else None,
        finished_at=unix(job.finished_at),
        hyperparameters=hyperparameters,
        model=record.model if record else base_name,
        seed=int(job.hyperparameters.get("seed", 0)),
        status=STATUS[job.status],
        trained_tokens=int(tokens) if tokens is not None else None,
        training_file=record.training_file if record else None,
        validation_file=record.validation_file if record else None,
        metadata=record.metadata if record else None,
        method=MethodOut(supervised=SupervisedOut(hyperparameters=hyperparameters)),
        lamina_job_id=job.id,
        lamina_method=job.method,
    )
