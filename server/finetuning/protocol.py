"""Request and response shapes of OpenAI's files and fine-tuning API, as Lamina serves them.

The field names and values are OpenAI's, so the official ``openai`` client reads them as its own
types; Lamina's additions are prefixed ``lamina_``. Requests forbid unknown keys, so a typo is a
400 naming the field rather than a setting silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FineTuningStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
AUTO: Literal["auto"] = "auto"


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int = Field(description="Unix seconds.")
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class Hyperparameters(BaseModel):
    """OpenAI's supervised hyper-parameters; "auto" leaves the value to Lamina's auto rules
    (``trainer.auto``)."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: Literal["auto"] | Annotated[int, Field(ge=1, le=1000)] = Field(
        AUTO, description="Passes over the training file → Lamina's `epochs`."
    )
    batch_size: Literal["auto"] | Annotated[int, Field(ge=1, le=1024)] = Field(
        AUTO, description="Examples per optimizer step → Lamina's `batch_size`."
    )
    learning_rate_multiplier: Literal["auto"] | Annotated[float, Field(gt=0, le=100)] = Field(
        AUTO,
        description="Multiplies the learning rate Lamina's auto rule picks for the method "
        "→ Lamina's `learning_rate`.",
    )


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(BaseModel):
    """OpenAI's ``method``. Only ``supervised`` trains here; Lamina's anti-forgetting preset is
    chosen with ``metadata.lamina_method`` (default: the server's default method)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: dict[str, Any] | None = None
    reinforcement: dict[str, Any] | None = None


class FineTuningJobCreate(BaseModel):
    """``POST /v1/fine_tuning/jobs``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description='The base model: "base" (the served base model id).')
    training_file: str = Field(description="A file-... id uploaded with purpose fine-tune.")
    validation_file: str | None = Field(
        None,
        description="Never trained on: the task's evaluation set. The task is scored on it before it "
        "goes live and before every later publish, which is refused if it would make `continual` "
        "forget this task (at most 50 of its examples are used, a seeded sample).",
    )
    suffix: str | None = Field(
        None,
        max_length=64,
        description="The Lamina task's name, which is also its model id: [a-z0-9][a-z0-9_-]{0,63}. "
        "Default: ft- and the first 12 hex digits of the training file's id.",
    )
    method: Method | None = None
    hyperparameters: Hyperparameters | None = Field(
        None, description="OpenAI's older place for method.supervised.hyperparameters; give one of the two."
    )
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(
        None,
        max_length=16,
        description='Echoed back. `lamina_method` picks Lamina\'s preset (e.g. "lori-s").',
    )
    integrations: list[dict[str, Any]] | None = Field(None, description="None supported: must be empty.")


class SupervisedOut(BaseModel):
    hyperparameters: Hyperparameters


class MethodOut(BaseModel):
    type: Literal["supervised"] = "supervised"
    supervised: SupervisedOut


class JobErrorOut(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobErrorOut | None = None
    fine_tuned_model: str | None = Field(
        None, description="Set once the job succeeded: the task's name, a `model` the completions accept."
    )
    finished_at: int | None = None
    hyperparameters: Hyperparameters
    model: str
    organization_id: str = "lamina"
    result_files: list[str] = Field(default_factory=list)
    seed: int
    status: FineTuningStatus
    trained_tokens: int | None = Field(None, description="Completion tokens trained on (all steps).")
    training_file: str | None = Field(None, description="None for a job posted to /tasks.")
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    method: MethodOut
    lamina_job_id: str = Field(description="The same job on /tasks.")
    lamina_method: str = Field(description="The Lamina preset that trains it.")


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningJobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any] | None = None
    type: Literal["message", "metrics"] = "message"


class FineTuningJobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool


class Checkpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, float]
    step_number: int


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Checkpoint]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FineTuneRecord(BaseModel):
    """What a job created through /v1/fine_tuning/jobs keeps beside the job board's own record:
    the OpenAI request as accepted (the board holds the Lamina side)."""

    job_id: str
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: int
    metadata: dict[str, str] | None = None
    hyperparameters: Hyperparameters = Field(description="As requested; what trained is on the board.")
