"""The statistics of a whole store: every module, from scratch or as an update by one task.

Its own module because this is where the one-module-at-a-time order is decided: with a lazy
source, only one module's factors (of every task) are in memory at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from adapters_store.lora import LoraAdapter
from adapters_store.stats.factors import AdapterList, FactorSource, as_source
from adapters_store.stats.module import ModuleStats
from adapters_store.stats.params import StatsParams
from adapters_store.stats.products import ModuleGrams
from adapters_store.stats.view import summary


@dataclass(frozen=True)
class StoreStats:
    """The statistics of a sequence of tasks (oldest first), module by module."""

    params: StatsParams
    tasks: tuple[str, ...]  # task version ids, e.g. "alpha/v1"
    modules: dict[str, ModuleStats]

    def to_dict(self, *, module_matrices: bool = False) -> dict[str, Any]:
        """JSON-ready summary; see :func:`summary` for the schema."""
        return summary(self, module_matrices=module_matrices)


def compute_stats(
    tasks: Sequence[LoraAdapter] | FactorSource, names: Sequence[str], params: StatsParams | None = None
) -> StoreStats:
    """The statistics of ``tasks`` (oldest first), from scratch, one module at a time.

    Only one module's factors (of every task) are in memory at once when ``tasks`` is a lazy
    :class:`FactorSource`; ΔW is never formed for more than ``row_chunk`` rows at once.
    """
    params = params or StatsParams()
    source = as_source(tasks)
    if len(names) != len(source):
        raise ValueError(f"{len(names)} names for {len(source)} tasks")
    modules: dict[str, ModuleStats] = {}
    for module in source.module_names():
        factors = [source.factors(i, module) for i in range(len(source))]
        shape = next(f.shape for f in factors if f is not None)
        stats = ModuleStats.empty(module, shape, params)
        grams = ModuleGrams(factors)
        for t, f in enumerate(factors):
            stats = stats.append(f, factors[:t], params, grams)
        modules[module] = stats
    return StoreStats(params, tuple(names), modules)


def update_stats(
    previous: StoreStats, earlier: Sequence[LoraAdapter] | FactorSource, new: LoraAdapter, name: str
) -> StoreStats:
    """``previous`` plus one more task, without recomputing anything about earlier pairs.

    ``earlier`` are the tasks ``previous`` was computed from, oldest first; only their A and B
    are read (OO, AWOM), one module at a time. ``previous`` is not modified.
    """
    source = as_source(earlier)
    if len(source) != len(previous.tasks):
        raise ValueError(f"previous stats cover {len(previous.tasks)} tasks, got {len(source)} earlier ones")
    params, t = previous.params, len(previous.tasks)
    added = AdapterList([new])
    modules: dict[str, ModuleStats] = {}
    for module in sorted(set(previous.modules) | set(new.modules)):
        f = added.factors(0, module)
        stats = previous.modules.get(module)
        if stats is None:  # first task to adapt this module: the earlier ones were absent
            assert f is not None
            stats = ModuleStats.empty(module, f.shape, params)
            for i in range(t):
                stats = stats.append(None, [None] * i, params)
        earlier_factors = [source.factors(i, module) for i in range(t)] if f is not None else [None] * t
        modules[module] = stats.append(f, earlier_factors, params)
    return StoreStats(params, (*previous.tasks, name), modules)
