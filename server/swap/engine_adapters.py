"""The adapters this server has put into the engine: one explicit record per engine adapter.

Every version the hot-swap serves goes into the engine under its own name and a fresh integer id
(vLLM caches prefix blocks per adapter name and id) and comes out once no route points at
it and no request still decodes with it. :class:`EngineAdapters` is the one place that adds
adapters to the engine and removes them, so what the engine holds, and in which state, is read
from one record per adapter (as LoRAX's loader keeps a state per adapter) instead of being
inferred from a dict of handles beside counters.

Its callers serialise the operations (``AdapterSync`` holds its lock around every sync and every
sweep), so ``loading`` and ``unloading`` last exactly as long as the engine call does: a record
whose load fails is dropped, and one whose removal fails is ``loaded`` again, as far as the server
knows it still is, for the next sweep to retry.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from server.engine import AdapterHandle, Engine
from server.metrics import LaminaMetrics

log = logging.getLogger(__name__)

_IDS = itertools.count(1)
"""Adapter ids for the whole process: it has one engine, and an id vLLM has seen is never given to
another adapter, even by a second table on the same engine (the engine tests build two)."""


class AdapterState(StrEnum):
    LOADING = "loading"  # the engine is adding it
    LOADED = "loaded"  # in the engine: routes may point at it, requests may hold it
    UNLOADING = "unloading"  # the engine is removing it


@dataclass
class LoadedAdapter:
    """One adapter in the engine: its handle (whose name says which version it serves, e.g.
    ``alpha@v2``, ``continual@m3`` or the correction ``alpha@v2~m3``), its state, and when the
    engine took it (wall clock; None while loading)."""

    handle: AdapterHandle
    state: AdapterState
    loaded_at: float | None = None


class EngineAdapters:
    """The engine's adapters by name, with the load/unload operations and their metrics and logs."""

    def __init__(self, engine: Engine, metrics: LaminaMetrics) -> None:
        self._engine, self._metrics = engine, metrics
        self._records: dict[str, LoadedAdapter] = {}  # engine adapter name -> its record

    def get(self, name: str) -> AdapterHandle | None:
        """The handle loaded under ``name``, or None when the engine does not have it."""
        record = self._records.get(name)
        return record.handle if record is not None else None

    def records(self) -> list[LoadedAdapter]:
        return list(self._records.values())

    def handles(self) -> list[AdapterHandle]:
        return [record.handle for record in self._records.values()]

    async def load(self, name: str, path: Path) -> AdapterHandle:
        """Put the adapter at ``path`` into the engine under ``name`` and a fresh id, once: a name
        already loaded returns its handle (a name always means the same version)."""
        if name in self._records:
            return self._records[name].handle
        record = LoadedAdapter(AdapterHandle(name, next(_IDS), str(path)), AdapterState.LOADING)
        self._records[name] = record
        try:
            await self._engine.add_adapter(record.handle)
        except BaseException:
            del self._records[name]
            raise
        record.state, record.loaded_at = AdapterState.LOADED, time.time()
        self._metrics.adapter_loads.inc()
        self._metrics.adapters_loaded.set(len(self._records))
        log.info("loaded adapter %s (id %d) from %s", name, record.handle.lora_id, path)
        return record.handle

    async def unload_unused(self, in_use: Callable[[AdapterHandle], bool]) -> None:
        """Remove from the engine every loaded adapter that ``in_use`` says no route points at and
        no request holds (``ModelRegistry.in_use``); one still held stays until a later sweep."""
        for name, record in list(self._records.items()):
            if record.state is not AdapterState.LOADED or in_use(record.handle):
                continue
            record.state = AdapterState.UNLOADING
            try:
                await self._engine.remove_adapter(record.handle)
            except BaseException:
                record.state = AdapterState.LOADED  # as far as the server knows; the next sweep retries
                raise
            del self._records[name]
            self._metrics.adapter_unloads.inc()
            self._metrics.adapters_loaded.set(len(self._records))
            log.info("unloaded adapter %s (id %d)", name, record.handle.lora_id)
