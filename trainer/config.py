"""What a training run is asked to do: the method (a preset) and its hyper-parameters.

This module imports neither torch nor transformers: the API process imports it to validate a
``POST /tasks`` request before anything is queued, so a bad key is rejected at the door with
the offending field's name instead of failing minutes later inside a worker.

A method is three independent choices (DESIGN.md, "Methods"): a *parametrization* (how
ΔW = scale · B @ A is trained), *regularizers* added to the loss, each with its own λ, and a
*merge* (how the continual model combines the tasks). :data:`PRESETS` names the papers'
combinations; :class:`Hyperparameters` holds the numbers a user may tune per task.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal, TypeAlias, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ParametrizationName = Literal["lora", "lori", "loraf", "inflora"]
RegularizerName = Literal["l1", "stability", "orthogonal"]
MergeName = Literal["concat", "magnitude", "sum", "linear", "latest"]

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


class Hyperparameters(BaseModel):
    """The numbers of one task's training run. Unknown keys are rejected (``extra="forbid"``)."""

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
    sparsity: Annotated[
        float,
        Field(
            ge=0.0,
            lt=1.0,
            description="LoRI-S: fraction of B masked out; the global top-(1 − s) |B| are kept.",
        ),
    ] = 0.9
    mask_fraction: Annotated[
        float,
        Field(
            gt=0.0,
            le=1.0,
            description="LoRAF: share of each module's B one task claims, k = ⌊f · d_out · r⌋.",
        ),
    ] = 0.1
    calibration_steps: Annotated[
        int,
        Field(
            ge=1,
            le=100_000,
            description="Unmasked steps whose |B| (LoRI-S) or |ΔB| (LoRAF) choose the task's mask.",
        ),
    ] = 20
    subspace_energy: Annotated[
        float,
        Field(
            gt=0.0,
            lt=1.0,
            description="inflora: fraction ε of each earlier task's input energy, per module, that the "
            "protected subspace holds; the new task's frozen A is drawn orthogonal to it. Higher: less "
            "forgetting, fewer free directions for later tasks (on the embedded model 0.999 filled a "
            "module after 5 of 15 tasks; 0.99 left 9 % of the fullest one free after all 15).",
        ),
    ] = 0.99
    subspace_base_energy: Annotated[
        float,
        Field(
            ge=0.0,
            lt=1.0,
            description="inflora: before a store's first task, the fraction of the base model's own input "
            "energy (on text it samples itself) that the protected subspace holds, so what the model knew "
            "before any task survives them. Higher keeps more of it and leaves fewer directions to the "
            "tasks (embedded model, 15 tasks: 0.99 kept 70 % of the probe but forgot 29 points of the "
            "tasks, 0.9 kept 50 % and forgot 12). 0 protects only the tasks. The first task of a store "
            "sets it; later tasks keep what it chose.",
        ),
    ] = 0.9
    subspace_init: Annotated[
        Literal["inputs", "random"],
        Field(
            description='inflora: how the frozen A is drawn inside the free directions. "inputs" '
            "(InfLoRA's choice): the r free directions where this task's own inputs, on the served model, "
            'have the most energy; "random": LoRI\'s seeded random A, projected.',
        ),
    ] = "inputs"
    l1_lambda: Annotated[
        float | None,
        Field(
            ge=0,
            description="λ of the N-LoRA loss λ‖ΔW‖₁. None: the preset's value; set on a method without it to "
            "add it (e.g. O-LoRA + N-LoRA); 0 removes it.",
        ),
    ] = None
    stability_lambda: Annotated[
        float | None,
        Field(ge=0, description="λ of the PS-LoRA stability loss (eq. 4); None/0 as for l1_lambda."),
    ] = None
    orthogonal_lambda: Annotated[
        float | None, Field(ge=0, description="λ of the O-LoRA orthogonality loss; None/0 as for l1_lambda.")
    ] = None
    stability_alpha: Annotated[
        float | None,
        Field(
            gt=0,
            description="Temperature α of PS-LoRA's sign term tanh(α·ΔW_t)·tanh(α·S). The paper gives no value. "
            "None: per module α = STABILITY_ALPHA_RMS / rms(S), so an entry of S one rms in size gives "
            "tanh(α·S) = tanh(2) = 0.96 — a fixed α is inert for ΔW entries of ~5e-4 (tanh ≈ α·ΔW ≈ 0).",
        ),
    ] = None

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
    def _steps_or_epochs(self) -> Hyperparameters:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give either `steps` or `epochs`, not both")
        return self

    def regularizer_overrides(self) -> dict[str, float | None]:
        """λ overrides by regularizer name (None: keep the preset's)."""
        return {
            "l1": self.l1_lambda,
            "stability": self.stability_lambda,
            "orthogonal": self.orthogonal_lambda,
        }


class MethodSpec(BaseModel):
    """One continual-learning method: parametrization + regularizers + merge (DESIGN.md, "Methods")."""

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
        if self.sparsity is not None and self.parametrization not in ("lori", "inflora"):
            raise ValueError("sparsity is a lori / inflora setting")
        if self.warm_start and self.parametrization != "lora":
            raise ValueError("warm_start continues a trained A and B, so it needs the lora parametrization")
        if self.stack_history and (self.warm_start or self.parametrization == "loraf"):
            raise ValueError(
                "stack_history would count the earlier tasks twice: warm_start and loraf include them"
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


PRESETS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        # LoRI (Zhang et al. 2025): frozen random A, B dense (D) or masked at 90 % sparsity (S); concat merge.
        MethodSpec(name="lori-d", parametrization="lori", sparsity=0.0, merge="concat"),
        MethodSpec(name="lori-s", parametrization="lori", merge="concat"),
        # Ours, after GPM / InfLoRA: LoRI-D whose frozen A avoids the input directions of the live
        # tasks (measured on the served model), trained on top of them; concat merge.
        MethodSpec(
            name="inflora", parametrization="inflora", sparsity=0.0, merge="concat", stack_history=True
        ),
        # LoRAF: one shared A and B, disjoint per-task masks; the masked B's simply add up.
        MethodSpec(name="loraf", parametrization="loraf", merge="sum"),
        # N-LoRA: L1 on the full product ΔW. λ is far below the paper's 0.4 because the norm here is
        # summed over d_out × d_in entries of every module, not over an r × r product.
        MethodSpec(
            name="n-lora",
            parametrization="lora",
            regularizers={"l1": 1e-4},
            merge="concat",
            stack_history=True,
        ),
        # PS-LoRA: stability loss (eq. 4, λ = 0.01 as for llama2-7b long sequences) + magnitude merge (eq. 5).
        MethodSpec(
            name="ps-lora",
            parametrization="lora",
            regularizers={"stability": 0.01},
            merge="magnitude",
            stack_history=True,
        ),
        # O-LoRA: orthogonality of A_t to the earlier A_i (λ = 0.5 as in PS-LoRA's O-LoRA runs).
        MethodSpec(
            name="o-lora",
            parametrization="lora",
            regularizers={"orthogonal": 0.5},
            merge="concat",
            stack_history=True,
        ),
        # Baselines. IncLoRA, like the three above, trains each new LoRA with the earlier ones
        # frozen in the forward pass (PS-LoRA eq. 3); LoRI and LoRAF train on the base alone.
        MethodSpec(name="inc-lora", parametrization="lora", merge="concat", stack_history=True),
        MethodSpec(name="seq-lora", parametrization="lora", warm_start=True, merge="latest"),
    )
}


class UnknownMethodError(ValueError):
    """Raised for a method name that is not a preset."""


def resolve_method(name: str) -> MethodSpec:
    """The preset called ``name`` (case-insensitive), or :class:`UnknownMethodError` listing the choices."""
    try:
        return PRESETS[name.strip().lower()]
    except KeyError:
        raise UnknownMethodError(f"unknown method {name!r}; choose one of {sorted(PRESETS)}") from None
