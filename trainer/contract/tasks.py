"""What a task request holds, as the API validates it before anything is queued: its examples,
its method (a preset) and hyper-parameters, the resolution of ``"auto"`` values, and admission
(can it join this store?). Defined in the torch-free :mod:`trainer.config`, :mod:`trainer.auto`
and :mod:`trainer.admission`; the worker checks the same things again when the task's turn comes."""

from __future__ import annotations

from trainer.admission import admit
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
    "admit",
    "resolve_auto",
    "resolve_method",
]
