"""Continual-learning methods: the torch-free catalogue and the torch implementations it names.

:mod:`trainer.methods.catalog` registers every parametrization, regularizer, merge and preset once
(the built-ins in :mod:`trainer.methods.builtin`). :data:`PARAMETRIZATIONS` and
:data:`REGULARIZERS` look the torch implementations up through it. Names are loaded on first
use (PEP 562), so that importing the catalogue, as the API does to validate a request, does
not import torch. Merges live in ``adapters_store`` (they run where the store publishes).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The built-in parts register themselves in the catalogue when imported. Importing any
# ``trainer.methods`` module runs this package first, so the catalogue is never seen without them,
# and the catalogue (the mechanism) does not import its own entries.
from trainer.methods import builtin as _builtin  # noqa: F401

if TYPE_CHECKING:
    from trainer.methods.parametrizations import CapacityError
    from trainer.methods.registry import (
        PARAMETRIZATIONS,
        REGULARIZERS,
        Layers,
        LoraParams,
        Parametrization,
        Regularizer,
    )

_LAZY = {
    "CapacityError": "trainer.methods.parametrizations",
    "PARAMETRIZATIONS": "trainer.methods.registry",
    "REGULARIZERS": "trainer.methods.registry",
    "Layers": "trainer.methods.registry",
    "LoraParams": "trainer.methods.registry",
    "Parametrization": "trainer.methods.registry",
    "Regularizer": "trainer.methods.registry",
}

__all__ = [
    "PARAMETRIZATIONS",
    "REGULARIZERS",
    "CapacityError",
    "Layers",
    "LoraParams",
    "Parametrization",
    "Regularizer",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
