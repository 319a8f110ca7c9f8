"""What a training run is asked to do: the method (a preset) and its hyper-parameters.

This module imports neither torch nor transformers: the API process imports it to validate a
``POST /tasks`` request before anything is queued, so a bad key is rejected at the door with
the offending field's name instead of failing minutes later inside a worker.

A method is three independent choices (docs/methods.md): a *parametrization* (how
ΔW = scale · B @ A is trained), *regularizers* added to the loss, each with its own λ, and a
*merge* (how the continual model combines the tasks). :data:`PRESETS` names the papers'
combinations; :class:`Hyperparameters` holds the numbers a user may tune per task.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias, get_args

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from trainer.methods import catalog


class PluginSettings(BaseSettings):
    """Modules that register more methods in the catalogue (:mod:`trainer.methods.catalog`)."""

    model_config = SettingsConfigDict(env_prefix="LAMINA_", extra="ignore")

    plugins: str = Field(
        "",
        description="Comma-separated modules imported before the hyper-parameters are built, in the "
        "server and the worker alike; each registers its parts and presets at import (docs/contributing.md).",
    )

    def modules(self) -> list[str]:
        return [name.strip() for name in self.plugins.split(",") if name.strip()]


catalog.load_plugins(PluginSettings().modules())

# The names a request may use, derived from the catalogue (plugins included).
if TYPE_CHECKING:
    ParametrizationName: TypeAlias = str
    RegularizerName: TypeAlias = str
    MergeName: TypeAlias = str
else:
    ParametrizationName = Literal[catalog.names("parametrization")]
    RegularizerName = Literal[catalog.names("regularizer")]
    MergeName = Literal[catalog.names("merge")]

STABILITY_ALPHA_RMS = 2.0  # c in α = c / rms(S): see Hyperparameters.stability_alpha
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Example:
    """One training pair. The loss is taken on ``completion`` (plus EOS) only."""

    prompt: str
    completion: str


ChatRole = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a chat example, as in OpenAI's chat fine-tuning format.

    ``weight`` is read on assistant turns only: 1 learns the turn, 0 keeps it as context (a
    reply the model should not imitate, or one it already gives).
    """

    role: ChatRole
    content: str
    weight: Literal[0, 1] = 1

    def __post_init__(self) -> None:
        # The trainer also builds these from stored jobs: the rules hold whoever constructs one.
        if self.role not in get_args(ChatRole):
            raise ValueError(f"role must be one of {list(get_args(ChatRole))}, got {self.role!r}")
        if self.weight not in (0, 1):
            raise ValueError(f"weight must be 0 or 1, got {self.weight!r}")

    @property
    def trained(self) -> bool:
        """Whether the loss is taken on this turn."""
        return self.role == "assistant" and self.weight == 1


@dataclass(frozen=True)
class ChatExample:
    """A conversation rendered with the model's chat template; the loss is taken on the trained
    assistant turns only (their content and the template's end-of-turn tokens)."""

    messages: tuple[ChatMessage, ...]

    def __post_init__(self) -> None:
        # The last assistant turn is what a chat completion with the earlier messages should answer.
        if not self.messages or self.messages[-1].role != "assistant":
            raise ValueError("a chat example must end with an assistant message")
        if not any(message.trained for message in self.messages):
            raise ValueError("every assistant message has weight 0: nothing to learn")


TrainingExample: TypeAlias = Example | ChatExample


class SharedHyperparameters(BaseModel):
    """The numbers of one task's training run that every method reads. :class:`Hyperparameters`
    adds each catalogue part's own knobs as fields of the same flat model. Unknown keys are
    rejected (``extra="forbid"``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: Annotated[
        int, Field(ge=1, le=512, description="LoRA rank r of the task's adapter (vLLM serves r ≤ 512).")
    ] = 8
    lora_alpha: Annotated[
        int, Field(ge=1, le=4096, description="LoRA alpha; ΔW = (lora_alpha / r) · B @ A.")
    ] = 16
    learning_rate: Annotated[
        float | None,
        Field(gt=0, le=1.0, description='AdamW learning rate. None or "auto": chosen by trainer.auto.'),
    ] = None
    weight_decay: Annotated[
        float, Field(ge=0, le=1.0, description="AdamW decoupled weight decay (the seeds' papers use 0).")
    ] = 0.0
    steps: Annotated[
        int | None,
        Field(
            ge=1,
            le=1_000_000,
            description="Optimizer steps of the main phase. None: epochs × ceil(#examples / batch_size). "
            'Give either steps or epochs, not both; neither (or "auto"): chosen by trainer.auto.',
        ),
    ] = None
    epochs: Annotated[
        int | None,
        Field(ge=1, le=1000, description="Passes over the examples when `steps` is not given."),
    ] = None
    batch_size: Annotated[
        int | None,
        Field(ge=1, le=1024, description='Examples per optimizer step. None or "auto": trainer.auto.'),
    ] = None
    validation_fraction: Annotated[
        float,
        Field(
            ge=0.0,
            le=0.5,
            description="Share of the examples held out of training to measure the task on inputs it "
            "never saw (trainer.auto.held_out_count: only for tasks of 50 or more examples, at least 5). "
            "0 trains on every example.",
        ),
    ] = 0.1
    applies_to: Annotated[
        Literal["matching", "all"],
        Field(
            description='Which prompts `model="continual"` answers with the merge for this task: "matching" '
            '(prompts like the task\'s own; every other prompt gets the base model itself) or "all" (a '
            "task meant to change every answer: a style, a persona, a language; while it is live, every "
            "prompt gets the merge)."
        ),
    ] = "matching"
    max_grad_norm: Annotated[
        float | None,
        Field(gt=0, description="Clip the gradients' global L2 norm to this; None: no clipping."),
    ] = 1.0
    seed: Annotated[
        int,
        Field(
            ge=0,
            le=2**31 - 1,
            description="Seed of data order and initialisation. A task's random A is seeded with seed + the "
            "task's position in the store, so successive tasks get different A's.",
        ),
    ] = 0
    target_modules: Annotated[
        tuple[str, ...],
        Field(min_length=1, description="Short names of the linear layers that get an adapter (PEFT's)."),
    ] = DEFAULT_TARGET_MODULES
    max_seq_len: Annotated[
        int,
        Field(ge=8, le=32768, description="Longest prompt + completion in tokens; prompts lose their start."),
    ] = 512

    @field_validator("learning_rate", "steps", "epochs", "batch_size", mode="before")
    @classmethod
    def _auto(cls, value: object) -> object:
        """OpenAI's fine-tuning API writes "auto" for a value the service chooses; so does Lamina."""
        return None if value == "auto" else value

    @field_validator("target_modules")
    @classmethod
    def _module_names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        bad = [name for name in names if not _MODULE_NAME.match(name)]
        if bad:
            raise ValueError(f"target_modules must be short module names like 'q_proj', got {bad}")
        if len(set(names)) != len(names):
            raise ValueError(f"target_modules has duplicates: {list(names)}")
        return names

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> SharedHyperparameters:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give either `steps` or `epochs`, not both")
        return self

    def regularizer_overrides(self) -> dict[str, float | None]:
        """λ overrides by regularizer name (None: keep the preset's), from each regularizer's λ knob."""
        return {part.name: getattr(self, str(part.lambda_knob)) for part in catalog.parts("regularizer")}


def _knob_field(knob: catalog.Knob) -> tuple[Any, Any]:
    """A knob as a pydantic field definition: its type with its bounds and description, its default."""
    bounds = Field(description=knob.description, ge=knob.ge, gt=knob.gt, le=knob.le, lt=knob.lt)
    return (Annotated[knob.type, bounds], knob.default)


if TYPE_CHECKING:

    class _BuiltinKnobs:
        """Types of the built-in knobs, for mypy only (not a model, so no fields): their defaults,
        bounds and descriptions are the catalogue's; tests/unit/trainer/test_catalog.py checks these names
        against it. A plugin's knobs are read with getattr."""

        sparsity: float
        calibration_steps: int
        mask_fraction: float
        subspace_energy: float
        subspace_base_energy: float
        subspace_init: Literal["inputs", "random"]
        l1_lambda: float | None
        stability_lambda: float | None
        stability_alpha: float | None
        orthogonal_lambda: float | None

    class Hyperparameters(SharedHyperparameters, _BuiltinKnobs):
        pass

else:
    _clash = sorted({knob.name for knob in catalog.knobs()} & set(SharedHyperparameters.model_fields))
    if _clash:
        raise ValueError(f"knobs {_clash} would replace hyper-parameters every method shares; rename them")
    Hyperparameters = create_model(
        "Hyperparameters",
        __base__=SharedHyperparameters,
        __module__=__name__,
        __doc__="The numbers of one task's training run: the shared fields and every registered "
        'part\'s knobs, one flat model. Unknown keys are rejected (``extra="forbid"``).',
        **{knob.name: _knob_field(knob) for knob in catalog.knobs()},
    )


class MethodSpec(BaseModel):
    """One continual-learning method: parametrization + regularizers + merge (docs/methods.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(description="Preset name, e.g. 'lori-s'.")]
    parametrization: Annotated[ParametrizationName, Field(description="How the task's A and B are trained.")]
    merge: Annotated[MergeName, Field(description="How the continual model combines the live tasks.")]
    regularizers: Annotated[
        dict[RegularizerName, float],
        Field(description="Regularizer name → default λ; Hyperparameters' *_lambda fields override."),
    ] = {}
    sparsity: Annotated[
        float | None,
        Field(ge=0.0, lt=1.0, description="lori only: a fixed sparsity (lori-d: 0). None: Hyperparameters'."),
    ] = None
    warm_start: Annotated[
        bool, Field(description="Start A and B from the previous task's adapter and keep training (SeqLoRA).")
    ] = False
    stack_history: Annotated[
        bool,
        Field(
            description="Add the earlier tasks' frozen ΔW to the forward pass while training, as the IncLoRA, "
            "O-LoRA, N-LoRA and PS-LoRA papers do. False: train on the base model alone."
        ),
    ] = False

    @model_validator(mode="after")
    def _consistent(self) -> MethodSpec:
        """The combination must make sense for its parts, as the catalogue describes them."""
        part = catalog.get("parametrization", self.parametrization)
        if self.sparsity is not None and "sparsity" not in part.knob_names:
            raise ValueError(f"sparsity is a {' / '.join(catalog.owners('sparsity'))} setting")
        if self.warm_start and not part.continues_previous:
            able = " / ".join(p.name for p in catalog.parts("parametrization") if p.continues_previous)
            raise ValueError(
                f"warm_start continues a trained A and B, so it needs the {able} parametrization"
            )
        if self.stack_history and (self.warm_start or part.includes_history):
            raise ValueError(
                "stack_history would count the earlier tasks twice: warm_start and "
                + " / ".join(p.name for p in catalog.parts("parametrization") if p.includes_history)
                + " include them"
            )
        return self

    def lambdas(self, hp: Hyperparameters) -> dict[str, float]:
        """The regularizers to apply and their λ, after the hyper-parameters' overrides (zeros dropped)."""
        lambdas: dict[str, float] = {name: value for name, value in self.regularizers.items()}
        for name, value in hp.regularizer_overrides().items():
            if value is not None:
                lambdas[name] = value
        return {name: value for name, value in lambdas.items() if value > 0}

    def effective_sparsity(self, hp: Hyperparameters) -> float:
        return hp.sparsity if self.sparsity is None else self.sparsity


# The catalogue's presets (trainer/methods/builtin.py and plugins), validated as MethodSpecs.
PRESETS: dict[str, MethodSpec] = {
    preset.name: MethodSpec(
        name=preset.name,
        parametrization=preset.parametrization,
        merge=preset.merge,
        regularizers=dict(preset.regularizers),
        sparsity=preset.sparsity,
        warm_start=preset.warm_start,
        stack_history=preset.stack_history,
    )
    for preset in catalog.presets()
}
catalog.freeze()  # Hyperparameters and PRESETS are built: a later registration would not be in them


class UnknownMethodError(ValueError):
    """Raised for a method name that is not a preset."""


def resolve_method(name: str) -> MethodSpec:
    """The preset called ``name`` (case-insensitive), or :class:`UnknownMethodError` listing the choices."""
    try:
        return PRESETS[name.strip().lower()]
    except KeyError:
        raise UnknownMethodError(f"unknown method {name!r}; choose one of {sorted(PRESETS)}") from None
