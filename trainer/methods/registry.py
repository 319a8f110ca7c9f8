"""The torch side of the catalogue: the protocols a part implements, and the lookup tables.

The training loop looks a parametrization up with ``PARAMETRIZATIONS[spec.parametrization]`` and
each regularizer with ``REGULARIZERS[name]``, so it never branches on a method. Both tables are
read-only views of :mod:`trainer.methods.catalog`: a part registers its implementation there,
once, with its knobs and capacity check (the pattern of PEFT's ``register_peft_method``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from adapters_store.lora import LoraAdapter
from adapters_store.subspace import Subspace
from trainer.config import Hyperparameters, MethodSpec
from trainer.methods import catalog


@dataclass(frozen=True)
class LoraParams:
    """The live, trainable weights of one injected LoRA layer (views of PEFT's parameters)."""

    A: nn.Parameter  # (r, d_in)
    B: nn.Parameter  # (d_out, r)
    scale: float  # lora_alpha / r


Layers = dict[str, LoraParams]  # keyed by module path, e.g. "model.layers.0.self_attn.q_proj"


class Parametrization(Protocol):
    """How a task's A and B are initialised, constrained and exported.

    The loop calls, in order: ``setup`` once; ``calibrate`` once after ``calibration_steps``
    steps (only if that is > 0); ``after_step`` after every optimizer step; ``export`` at the end;
    ``close`` always (also on errors), to remove gradient hooks.
    """

    calibration_steps: int
    protects_inputs: bool  # publishing records the task's input subspace (inflora)

    def setup(self, layers: Layers) -> None: ...
    def calibrate(self, layers: Layers) -> None: ...
    def after_step(self, layers: Layers) -> None: ...
    def export(self, layers: Layers) -> LoraAdapter: ...
    def metrics(self) -> dict[str, float | int | str]: ...
    def close(self) -> None: ...


class Regularizer(Protocol):
    """A loss term on the new task's weights, built once per task from the earlier tasks' adapters.

    ``__call__`` returns the term *without* its λ; the loop multiplies.
    """

    def __call__(self, layers: Layers) -> torch.Tensor: ...


# (hp, method, history, subspace): subspace is the store's protected input basis (inflora) or None.
ParametrizationFactory = Callable[
    [Hyperparameters, MethodSpec, list[LoraAdapter], Subspace | None], Parametrization
]
RegularizerFactory = Callable[[Hyperparameters, list[LoraAdapter]], Regularizer]


class _Implementations(Mapping[str, Any]):
    """Name -> the torch factory the catalogue names for it (imported on first lookup)."""

    def __init__(self, kind: catalog.Kind) -> None:
        self.kind = kind

    def __getitem__(self, name: str) -> Any:
        if name not in catalog.names(self.kind):
            raise KeyError(name)
        return catalog.resolve(catalog.get(self.kind, name).implementation)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[str]:
        return iter(catalog.names(self.kind))

    def __len__(self) -> int:
        return len(catalog.names(self.kind))


PARAMETRIZATIONS: Mapping[str, ParametrizationFactory] = _Implementations("parametrization")
REGULARIZERS: Mapping[str, RegularizerFactory] = _Implementations("regularizer")
