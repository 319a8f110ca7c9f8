"""Continual-learning methods as registered pieces: parametrizations and regularizers.

Importing this package registers everything in :data:`PARAMETRIZATIONS` and :data:`REGULARIZERS`.
Merges live in ``adapters_store`` (they run where the store publishes, not where it trains).
"""

from trainer.methods import parametrizations, regularizers  # noqa: F401  (registers by import)
from trainer.methods.parametrizations import CapacityError
from trainer.methods.registry import (
    PARAMETRIZATIONS,
    REGULARIZERS,
    Layers,
    LoraParams,
    Parametrization,
    Regularizer,
    register_parametrization,
    register_regularizer,
)

__all__ = [
    "PARAMETRIZATIONS",
    "REGULARIZERS",
    "CapacityError",
    "Layers",
    "LoraParams",
    "Parametrization",
    "Regularizer",
    "register_parametrization",
    "register_regularizer",
]
