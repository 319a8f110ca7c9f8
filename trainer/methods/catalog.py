"""The method catalogue: every parametrization, regularizer, merge and preset, registered once.

A method is three independent choices (docs/methods.md). Each choice is a :class:`Part`
that names, in one place, everything the rest of Lamina needs to know about it:

- its hyper-parameters (:class:`Knob`: type, default, bounds, a description): they become fields
  of the flat :class:`trainer.config.Hyperparameters` a user posts with ``POST /tasks``;
- its implementation (a torch factory, given as ``"module:attr"`` so this module and the API
  that validates requests never import torch; merges are implemented in ``adapters_store``);
- its capacity check (can this store take the task? see :mod:`trainer.methods.capacity`) and the
  ledger notes a published task leaves (e.g. LoRAF growing the shared rank);
- its traits that decide which presets are consistent (``warm_start`` needs a parametrization
  that continues the previous adapter, ...).

A :class:`Preset` names a combination users pick by name (``lori-s``, ``ps-lora``, ...).

Everything else is derived from here: the ``Literal`` name types and the hyper-parameter fields of
:mod:`trainer.config`, admission, the worker's ledger notes, the benchmark's method list, and the
torch-side lookup tables of :mod:`trainer.methods.registry` (PEFT's ``register_peft_method``
idea: a method brings its config and its model class in one call).

Plugins: ``LAMINA_PLUGINS`` names modules (comma-separated) that are imported when
:mod:`trainer.config` is first imported, in every process (server and worker alike), before the
hyper-parameter model is built; a plugin module calls :func:`register` and
:func:`register_preset` at import. Parts must be registered before ``trainer.config`` is
imported, which is why they are plugins rather than calls made later at run time.

This module imports neither torch nor anything that does.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

if TYPE_CHECKING:
    from adapters_store.lora import LoraAdapter
    from adapters_store.store import AdapterStore, TaskRecord

# The hyper-parameters a task trains with: :class:`trainer.config.Hyperparameters`, which is built
# from this catalogue's knobs, so this module names it only as a type parameter (importing it
# would make the catalogue and its product import each other).
HP = TypeVar("HP")

Kind = Literal["parametrization", "regularizer", "merge"]
KINDS: tuple[Kind, ...] = ("parametrization", "regularizer", "merge")

# "package.module:attribute", imported when first used, or the object itself.
Ref = str | Callable[..., Any]


@dataclass(frozen=True)
class Knob:
    """One hyper-parameter a part owns: a field of the flat ``hyperparameters`` of a task."""

    name: str
    type: Any  # the annotation, e.g. float, float | None, Literal["inputs", "random"]
    default: Any
    description: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None


@dataclass(frozen=True)
class CapacityRequest(Generic[HP]):
    """What a capacity check sees: the store the task would join and the task's settings
    (``CapacityRequest[Hyperparameters]``; the catalogue only passes ``hp`` on)."""

    store: AdapterStore
    tasks: list[TaskRecord]  # the store's live tasks, oldest first (read once per admission)
    hp: HP
    max_lora_rank: int  # the largest rank the engine serves
    grow_rank: int  # LAMINA_LORAF_GROW_RANK: ranks a full LoRAF store may grow by; 0: never


@dataclass(frozen=True)
class Part:
    """A parametrization, regularizer or merge, as the catalogue knows it.

    ``capacity(request) -> Hyperparameters`` returns the hyper-parameters to train with (a part may
    adjust them, e.g. LoRAF takes the store's shared rank) or raises
    :class:`trainer.contract.admission.AdmissionError`. ``notes(history, hp) -> list[dict]`` returns the
    ledger entries publishing the task adds (``history``: the live adapters it trained after).
    """

    kind: Kind
    name: str
    description: str
    knobs: tuple[Knob, ...] = ()
    # The torch factory: parametrization(hp, method, history, subspace); regularizer(hp, history).
    implementation: Ref | None = None
    capacity: Ref | None = None
    notes: Ref | None = None
    lambda_knob: str | None = None  # regularizer: the knob whose value overrides the preset's λ
    continues_previous: bool = False  # parametrization: can start from the previous adapter (warm_start)
    includes_history: bool = False  # parametrization: already trains on the earlier tasks (no stack_history)
    auto_learning_rate: float | None = None  # parametrization: trainer.auto's rate for a fully trained B

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "regularizer" and self.lambda_knob not in {k.name for k in self.knobs}:
            raise ValueError(f"regularizer {self.name!r}: lambda_knob must name one of its knobs")
        if self.kind == "parametrization" and (
            self.implementation is None or self.auto_learning_rate is None
        ):
            raise ValueError(
                f"parametrization {self.name!r} needs an implementation and an auto_learning_rate"
            )
        if self.kind == "regularizer" and self.implementation is None:
            raise ValueError(f"regularizer {self.name!r} needs an implementation")

    @property
    def knob_names(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.knobs)


@dataclass(frozen=True)
class Preset:
    """A named combination (``MethodSpec``'s fields): what a user posts as ``method``."""

    name: str
    parametrization: str
    merge: str
    regularizers: dict[str, float] = field(default_factory=dict)  # name -> default λ
    sparsity: float | None = None
    warm_start: bool = False
    stack_history: bool = False


_PARTS: dict[Kind, dict[str, Part]] = {kind: {} for kind in KINDS}
_KNOBS: dict[str, Knob] = {}
_PRESETS: dict[str, Preset] = {}
_frozen = False


def register(part: Part) -> Part:
    """Add ``part`` to the catalogue. Its knobs join the flat hyper-parameters; a knob may be
    shared by several parts (``calibration_steps``) if it is the same knob."""
    if _frozen:
        raise RuntimeError(
            f"{part.kind} {part.name!r} registered after trainer.config was imported: register it "
            "in a plugin module named by LAMINA_PLUGINS"
        )
    table = _PARTS[part.kind]
    if part.name in table:
        raise ValueError(f"{part.kind} {part.name!r} is already registered")
    for knob in part.knobs:
        if _KNOBS.get(knob.name, knob) != knob:
            raise ValueError(f"knob {knob.name!r} of {part.name!r} differs from the one already registered")
    table[part.name] = part
    for knob in part.knobs:
        _KNOBS.setdefault(knob.name, knob)
    return part


def register_preset(preset: Preset) -> Preset:
    """Add a preset; its parts must be registered already."""
    if _frozen:
        raise RuntimeError(f"preset {preset.name!r} registered after trainer.config was imported")
    if preset.name in _PRESETS:
        raise ValueError(f"preset {preset.name!r} is already registered")
    get("parametrization", preset.parametrization)
    get("merge", preset.merge)
    for name in preset.regularizers:
        get("regularizer", name)
    _PRESETS[preset.name] = preset
    return preset


def freeze() -> None:
    """Called by :mod:`trainer.config` once it has built the hyper-parameter model from the
    knobs: a later registration would not be in it, so it is refused with a clear error."""
    global _frozen
    _frozen = True


def get(kind: Kind, name: str) -> Part:
    try:
        return _PARTS[kind][name]
    except KeyError:
        raise KeyError(f"unknown {kind} {name!r}; known: {sorted(_PARTS[kind])}") from None


def names(kind: Kind) -> tuple[str, ...]:
    """Registered names of one kind, in registration order."""
    return tuple(_PARTS[kind])


def parts(kind: Kind) -> tuple[Part, ...]:
    return tuple(_PARTS[kind].values())


def knobs() -> tuple[Knob, ...]:
    """Every part's knobs, each once, in registration order."""
    return tuple(_KNOBS.values())


def presets() -> tuple[Preset, ...]:
    """Presets in registration order (the benchmark's method order)."""
    return tuple(_PRESETS.values())


def owners(knob: str, kind: Kind = "parametrization") -> tuple[str, ...]:
    """The parts of ``kind`` that own ``knob``."""
    return tuple(p.name for p in _PARTS[kind].values() if knob in p.knob_names)


def resolve(ref: Ref) -> Any:
    """The object a :data:`Ref` names, importing its module on first use."""
    if not isinstance(ref, str):
        return ref
    module, _, attribute = ref.partition(":")
    if not attribute:
        raise ValueError(f"a reference is 'package.module:attribute', got {ref!r}")
    return getattr(importlib.import_module(module), attribute)


def method_parts(parametrization: str, merge: str, regularizers: Iterable[str]) -> list[Part]:
    """The parts of one method, in the order admission checks them: merge, parametrization,
    regularizers."""
    return [
        get("merge", merge),
        get("parametrization", parametrization),
        *(get("regularizer", name) for name in regularizers),
    ]


def ledger_notes(
    parametrization: str,
    merge: str,
    regularizers: Iterable[str],
    history: list[LoraAdapter],
    hp: object,
) -> list[dict[str, Any]]:
    """The ledger entries the method's parts add when a task trained after ``history`` is published
    (``hp``, the task's :class:`trainer.config.Hyperparameters`, goes to each part's ``notes``)."""
    notes: list[dict[str, Any]] = []
    for part in method_parts(parametrization, merge, regularizers):
        if part.notes is not None:
            notes += resolve(part.notes)(history, hp)
    return notes


def load_plugins(modules: Iterable[str]) -> None:
    """Import each plugin module (it registers its parts and presets at import)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ImportError(
                f"LAMINA_PLUGINS names {module!r}, which cannot be imported: {error}"
            ) from error
