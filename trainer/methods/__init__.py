"""Continual-learning methods: the torch-free catalogue and the torch implementations it names.

:mod:`trainer.methods.catalog` registers every parametrization, regularizer, merge and preset once
(the built-ins in :mod:`trainer.methods.builtin`). :data:`~trainer.methods.registry.PARAMETRIZATIONS`
and :data:`~trainer.methods.registry.REGULARIZERS` look the torch implementations up through it.
The package re-exports nothing: a name is imported from the module that defines it
(``trainer.methods.registry``, ``trainer.methods.parametrizations``), so that importing the
catalogue, as the API does to validate a request, does not import torch, and so that the package
and its modules do not import each other. Merges live in ``adapters_store`` (they run where the
store publishes).
"""

# The built-in parts register themselves in the catalogue when imported. Importing any
# ``trainer.methods`` module runs this package first, so the catalogue is never seen without them,
# and the catalogue (the mechanism) does not import its own entries.
from trainer.methods import builtin as _builtin  # noqa: F401
