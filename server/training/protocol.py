"""Request shapes of the training API (``POST /tasks``). The job object it answers with is
``trainer.jobs.Job``, shared with the worker that updates it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from trainer.jobs import Job


class ExampleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    completion: str = Field(min_length=1)


class TaskCreate(BaseModel):
    """A task to learn: its name (which also becomes a `model` name), a method and examples."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="[a-z0-9][a-z0-9_-]{0,63}; unique in the store.")
    method: str | None = Field(
        None, description="A preset (lori-s, ps-lora, ...). Default: LAMINA_DEFAULT_METHOD."
    )
    examples: list[ExampleIn] = Field(min_length=1)
    hyperparameters: dict[str, Any] = Field(default_factory=dict)


class JobList(BaseModel):
    object: str = "list"
    data: list[Job]
