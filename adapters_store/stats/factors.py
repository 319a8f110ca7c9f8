"""Where the factors come from: one task's (A, B, scale, mask) in one module, and the sources
that hand them out a (task, module) at a time.

Its own module because the statistics never need every adapter at once: a lazy source
(:class:`~adapters_store.stats_cache.PeftDirectorySource` reads task version directories) lets a
computation stream over modules, and adapters already in memory are just another source.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from adapters_store.lora import LoraAdapter


@dataclass(frozen=True)
class Factors:
    """One task's factors in one module: ΔW = scale · B @ A.

    As in :class:`~adapters_store.lora.LoraModule`, B is stored already masked (zero outside
    ``mask``); :meth:`ModuleStats.append` checks that once per task and refuses a B that is not,
    since its ΔW would then differ from the one the merges build.
    """

    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r), zero outside mask
    scale: float
    mask: torch.Tensor | None = None  # bool (d_out, r); None: the task owns its whole B

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.B.shape[0]), int(self.A.shape[1])

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def owned(self) -> torch.Tensor:
        """M as bool (d_out, r): the B positions this task owns."""
        return torch.ones_like(self.B, dtype=torch.bool) if self.mask is None else self.mask.bool()


class FactorSource(Protocol):
    """The live tasks, oldest first, read one (task, module) at a time so that a caller can
    stream over modules instead of loading every adapter (see ``stats_cache``)."""

    def __len__(self) -> int: ...
    def module_names(self) -> list[str]: ...
    def factors(self, task: int, module: str) -> Factors | None: ...


class AdapterList:
    """A :class:`FactorSource` over adapters already in memory."""

    def __init__(self, adapters: Sequence[LoraAdapter]) -> None:
        self.adapters = list(adapters)

    def __len__(self) -> int:
        return len(self.adapters)

    def module_names(self) -> list[str]:
        return sorted({name for adapter in self.adapters for name in adapter.modules})

    def factors(self, task: int, module: str) -> Factors | None:
        adapter = self.adapters[task]
        m = adapter.modules.get(module)
        if m is None:
            return None
        mask = adapter.masks.get(module)
        if mask is not None and tuple(mask.shape) != tuple(m.B.shape):
            raise ValueError(f"mask of {module} has shape {tuple(mask.shape)}, B has {tuple(m.B.shape)}")
        return Factors(A=m.A, B=m.B, scale=float(m.scale), mask=mask)


def as_source(tasks: Sequence[LoraAdapter] | FactorSource) -> FactorSource:
    """Adapters in memory or a lazy source, as a source."""
    if hasattr(tasks, "factors"):
        return tasks  # type: ignore[return-value]
    return AdapterList(tasks)  # type: ignore[arg-type]
