"""Request shapes of the training API (``POST /tasks``). The job object it answers with is
``trainer.contract.jobs.PublicJob``: the job the worker updates, without the worker's claim.

An example has one of two shapes: ``{"prompt", "completion"}``, or OpenAI's chat fine-tuning
format ``{"messages": [...]}``. Every model forbids unknown keys, and :class:`ExampleIn`
picks the shape from the keys itself rather than trying both, so an error names the field of
the intended shape (``examples.0.completion``, ``examples.3.messages.1.role``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from trainer.contract.jobs import PublicJob
from trainer.contract.tasks import ChatExample, ChatMessage, ChatRole, Example, TrainingExample


class PromptExampleIn(BaseModel):
    """A prompt and its completion; the completion (then EOS) is learned."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    completion: str = Field(min_length=1)

    def to_example(self) -> Example:
        return Example(prompt=self.prompt, completion=self.completion)


class ChatMessageIn(BaseModel):
    """One message of a chat example."""

    model_config = ConfigDict(extra="forbid")

    role: ChatRole
    content: str
    weight: Literal[0, 1] | None = Field(
        None, description="Assistant messages only: 0 keeps the turn as context, not learned. Default 1."
    )

    @field_validator("weight")
    @classmethod
    def _assistant_only(cls, weight: int | None, info: ValidationInfo) -> int | None:
        if weight is not None and info.data.get("role") != "assistant":
            raise ValueError("weight is only allowed on assistant messages")
        return weight

    def to_message(self) -> ChatMessage:
        return ChatMessage(
            role=self.role, content=self.content, weight=1 if self.weight is None else self.weight
        )


class ChatExampleIn(BaseModel):
    """A conversation, rendered with the model's chat template; its assistant turns are learned.
    It must end with an assistant message: what a chat completion of the earlier ones answers."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessageIn] = Field(min_length=1)

    @field_validator("messages")
    @classmethod
    def _learnable(cls, messages: list[ChatMessageIn]) -> list[ChatMessageIn]:
        ChatExample(messages=tuple(m.to_message() for m in messages))  # the trainer's rules, as ValueError
        return messages

    def to_example(self) -> ChatExample:
        return ChatExample(messages=tuple(m.to_message() for m in self.messages))


class ExampleIn(RootModel[PromptExampleIn | ChatExampleIn]):
    """One training example: ``{"prompt", "completion"}`` or ``{"messages": [...]}``."""

    @model_validator(mode="wrap")
    @classmethod
    def _one_shape(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # Validating the chosen shape here keeps pydantic's union member names out of error paths.
        if isinstance(data, dict):
            data = (ChatExampleIn if "messages" in data else PromptExampleIn).model_validate(data)
        elif not isinstance(data, PromptExampleIn | ChatExampleIn | ExampleIn):
            raise ValueError('an example is an object: {"prompt", "completion"} or {"messages"}')
        return handler(data)

    def to_example(self) -> TrainingExample:
        return self.root.to_example()


class TaskCreate(BaseModel):
    """A task to learn: its name (which also becomes a `model` name), a method and examples."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="[a-z0-9][a-z0-9_-]{0,63}; unique in the store.")
    method: str | None = Field(
        None, description="A preset (lori-s, ps-lora, ...). Default: LAMINA_DEFAULT_METHOD."
    )
    examples: list[ExampleIn] = Field(min_length=1)
    validation_examples: list[ExampleIn] | None = Field(
        None,
        description="Your own evaluation set, never trained on: the task is scored on it before it "
        "goes live (metrics.validation_accuracy) and again before every later publish, so that a "
        "later task that would make `continual` forget it is refused. Default: the examples the "
        "job holds out. At most 50 are used (a seeded sample).",
    )
    hyperparameters: dict[str, Any] = Field(default_factory=dict)


class JobList(BaseModel):
    object: str = "list"
    data: list[PublicJob]
