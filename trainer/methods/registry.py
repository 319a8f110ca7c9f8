"""Parametrizations and regularizers registered by name, so the loop never branches on a method.

The training loop looks a parametrization up with ``PARAMETRIZATIONS[spec.parametrization]`` and
each regularizer with ``REGULARIZERS[name]``; adding a method is writing one class and decorating
it (the pattern of PEFT's ``register_peft_method``). The names must also appear in the
``Literal`` types of :mod:`trainer.config`, which validates requests without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from adapters_store.lora import LoraAdapter
from adapters_store.subspace import Subspace
from trainer.config import Hyperparameters, MethodSpec


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

PARAMETRIZATIONS: dict[str, ParametrizationFactory] = {}
REGULARIZERS: dict[str, RegularizerFactory] = {}

_T = TypeVar("_T")


def _register(table: dict[str, Any], name: str) -> Callable[[_T], _T]:
    def decorator(factory: _T) -> _T:
        if name in table:
            raise ValueError(f"{name!r} is already registered")
        table[name] = factory
        return factory

    return decorator


def register_parametrization(name: str) -> Callable[[_T], _T]:
    """Class decorator: ``@register_parametrization("lori")``."""
    return _register(PARAMETRIZATIONS, name)


def register_regularizer(name: str) -> Callable[[_T], _T]:
    """Class decorator: ``@register_regularizer("l1")``."""
    return _register(REGULARIZERS, name)
