"""What a task request holds, as the API validates it before anything is queued: its examples,
its method (a preset) and hyper-parameters, and the resolution of ``"auto"`` values.

The one contract module that re-exports: these types are built from the method catalogue
(every registered part, plugins included, adds its hyper-parameters as fields), so they are
defined beside it, in the torch-free :mod:`trainer.config` and :mod:`trainer.auto`, and the
server reaches them here. Admission is :mod:`trainer.contract.admission`."""

from __future__ import annotations

from trainer.auto import resolve as resolve_auto
from trainer.config import (
    ChatExample,
    ChatMessage,
    ChatRole,
    Example,
    Hyperparameters,
    MethodSpec,
    TrainingExample,
    UnknownMethodError,
    resolve_method,
)

__all__ = [
    "ChatExample",
    "ChatMessage",
    "ChatRole",
    "Example",
    "Hyperparameters",
    "MethodSpec",
    "TrainingExample",
    "UnknownMethodError",
    "resolve_auto",
    "resolve_method",
]
