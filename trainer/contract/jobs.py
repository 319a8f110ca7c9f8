"""The training job as both sides see it: the worker records progress in a :class:`Job`, the
API returns its :class:`PublicJob` view. The board that stores them is :mod:`trainer.contract.board`."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field


class JobStatus(StrEnum):
    queued = "queued"
    validating = "validating"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


LOSS_CURVE_POINTS = 100


class Progress(BaseModel):
    step: int
    total: int
    loss: float | None = None


class JobError(BaseModel):
    message: str
    param: str | None = None
    code: str | None = None


class PublicJob(BaseModel):
    """A training job as the API shows it (``GET /jobs/{id}``): what was asked and how far it got,
    without the worker's claim (which process holds it, until when, under which fencing token)."""

    id: str
    object: Literal["task.job"] = "task.job"
    name: str = Field(description="The task's name; also the `model` that serves its own adapter.")
    method: str
    status: JobStatus = JobStatus.queued
    seq: int = Field(description="Arrival order; tasks of one store train in this order.")
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    n_examples: int
    n_validation_examples: int = Field(
        0,
        description="The user's own evaluation set, if posted (else the task is scored on held-out examples).",
    )
    hyperparameters: dict[str, Any] = Field(
        default_factory=dict,
        description='As posted; once the job succeeds, as trained (every "auto" value resolved).',
    )
    progress: Progress | None = None
    loss_curve: list[tuple[int, float]] = Field(
        default_factory=list,
        description="[step, loss] points of the training so far, at most LOSS_CURVE_POINTS "
        "(thinned evenly as training goes on): the job's loss curve without a metrics service.",
    )
    metrics: dict[str, Any] = Field(default_factory=dict)
    warnings: list[str] = Field(
        default_factory=list,
        description="Why a succeeded task may not do what was asked, e.g. it did not learn its examples.",
    )
    error: JobError | None = None
    task_version: str | None = Field(None, description="Store id of the published task version.")
    merge_id: str | None = Field(None, description="Store id of the merge made live by this job.")
    cancel_requested: bool = False

    @classmethod
    def of(cls, job: PublicJob) -> PublicJob:
        """The public view of a job record (the claim's fields dropped)."""
        return cls.model_validate(job.model_dump(include=set(cls.model_fields)))


class Job(PublicJob):
    """A job as the board records it: the public view plus the worker's claim."""

    worker: str | None = Field(None, description="The worker process that claimed the job.")
    lease_expires_at: float | None = Field(
        None, description="Unix time until which the worker's claim holds; renewed while it trains."
    )
    generation: int | None = Field(
        None,
        description="The claim's fencing token: one more than any earlier claim on this board. "
        "The store publishes only while the claim with this generation still holds.",
    )


class JobNotFound(LookupError):
    pass


class JobRefused(ValueError):
    """The board will not take a new job: its name is already pending, or too many are."""

    def __init__(self, reason: str, pending: int) -> None:
        super().__init__(reason)
        self.reason = reason  # "name_pending" | "queue_full"
        self.pending = pending
