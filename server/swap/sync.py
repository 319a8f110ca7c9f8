"""Keep the running engine in step with the adapter store, with no restart.

The store's ledger is the truth: on start-up and after every change (a Redis event, or the
ledger file growing), ``AdapterSync.sync`` reads the live tasks and the live merge, loads
any version the engine does not have yet under a fresh name and id, flips the aliases, and
unloads versions that no alias points at and no request still holds (server/swap/engine_adapters.py
keeps one record per engine adapter and its state).

A version that fails to load leaves the aliases as they were: the live model never changes
half-way. The live merge (``continual``) is served one of two ways (``LAMINA_CONTINUAL_SERVING``;
its default, ``auto``, is ``lora`` under the default task routing, where general prompts go to the
base and task prompts to the tasks' own models, and ``weights`` otherwise):

- ``weights``: W0 + ΔW is written into the engine's weights, for every merge kind
  (exact, and no LoRA cost per token); ``base`` and every task are served as correction
  adapters relative to those weights (server/swap/weights.py). A swap drains running requests
  first, so each request runs on the weights it started with.
- ``lora``: the engine's weights stay W0, so ``base`` is exact at the base's speed and no swap
  holds requests back; the merge is a LoRA adapter; a dense (magnitude) merge as its best rank-R
  approximation at the engine's max_lora_rank (the relative error is logged and reported). The
  store writes that export beside the merge when its rank matches; otherwise it is computed
  here once, into the cache. ``base`` and every task keep their own weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters_store.events import EventFollower, LedgerWatcher
from adapters_store.lora import LoraAdapter
from adapters_store.merges import DenseDelta
from adapters_store.store import AdapterStore, MergeRecord, TaskRecord
from server.engine import AdapterHandle, Engine
from server.metrics import LaminaMetrics
from server.openai.routing import ContinualRouter
from server.swap.engine_adapters import EngineAdapters
from server.swap.registry import CONTINUAL, ModelRegistry, Route, RouteKind
from server.swap.weights import WeightsServing, write_cached

log = logging.getLogger(__name__)


@dataclass
class SyncStatus:
    """What the last sync did, for /ready and the admin view."""

    live_merge: str | None = None
    tasks: list[str] = field(default_factory=list)
    last_error: str | None = None
    svd_relative_error: float | None = None
    syncs: int = 0  # attempts, failed ones included
    in_step: bool = False  # the last attempt serves what the ledger says is live
    failures_in_a_row: int = 0  # > 0: the server retries on its own after retry_in_s
    retry_in_s: float | None = None
    serving: str = "lora"  # LAMINA_CONTINUAL_SERVING
    weights: dict[str, Any] | None = None  # weights serving: the merge in the weights, swap times
    corrections: dict[str, dict[str, Any]] | None = None  # weights serving: model -> rank, error


class AdapterSync:
    """Mirrors one store into one engine's adapters and the registry's aliases."""

    def __init__(
        self,
        engine: Engine,
        registry: ModelRegistry,
        store: AdapterStore,
        cache_dir: Path,
        max_lora_rank: int,
        events_url: str | None = None,
        poll_interval_s: float = 0.5,
        dense_serving: str = "lora",
        base_model_dir: Path | None = None,
        metrics: LaminaMetrics | None = None,
        drain_s: float = 60.0,
        router: ContinualRouter | None = None,
    ) -> None:
        self.engine, self.registry, self.store = engine, registry, store
        self.metrics = metrics or LaminaMetrics()
        self.cache_dir = cache_dir
        self.dense_serving = dense_serving
        self.base_model_dir = base_model_dir
        self.weights: WeightsServing | None = None
        if dense_serving == "weights":
            assert base_model_dir is not None, "weights serving needs the base model directory"
            self.weights = WeightsServing(
                engine, registry, base_model_dir, cache_dir, max_lora_rank, drain_s, store.base_model
            )
        self.max_lora_rank = max_lora_rank
        self.events_url = events_url
        self.poll_interval_s = poll_interval_s
        self.status = SyncStatus(serving=dense_serving)
        self.router = router  # told the live tasks' routing prototypes on every sync
        self.adapters = EngineAdapters(engine, self.metrics)  # what the engine holds, one record each
        self._lock = asyncio.Lock()  # one sync or sweep at a time: loads never race unloads
        # (live merge, live task ids) as of the last successful sync; None before the first one
        self._serving: tuple[str | None, tuple[str, ...]] | None = None
        registry.set_route(Route(CONTINUAL, None, RouteKind.continual))  # no tasks yet: continual = base

    # --- one sync ---------------------------------------------------------------------------

    async def sync(self) -> bool:
        """Serve what the ledger says is live; True when it now does. A failure keeps the live
        model as it was and is retried by :meth:`follow` with a growing delay."""
        async with self._lock:
            before, status = self._serving, self.status
            try:
                await self._sync()
                status.last_error, status.in_step, status.failures_in_a_row = None, True, 0
                status.retry_in_s = None
            except Exception as error:  # the live model stays as it was
                status.failures_in_a_row += 1
                status.retry_in_s = retry_delay(self.poll_interval_s, status.failures_in_a_row)
                log.exception(
                    "adapter sync failed (%d in a row); keeping the current adapters, retrying in %.1f s",
                    status.failures_in_a_row, status.retry_in_s,
                )  # fmt: skip
                status.last_error, status.in_step = f"{type(error).__name__}: {error}", False
                self.metrics.sync_failures.inc()
            else:
                if before is not None and self._serving != before:  # not the start-up sync
                    self.metrics.swapped(self._live_since())
            finally:
                status.syncs += 1
            await self.adapters.unload_unused(self.registry.in_use)
            return status.in_step

    def _live_since(self) -> str | None:
        """When the ledger last changed what is live (its ``set_live`` entry's timestamp)."""
        for entry in reversed(self.store.ledger()):
            if entry.get("op") == "set_live":
                return str(entry["ts"])
        return None

    async def _sync(self) -> None:
        snapshot = self.store.snapshot()  # live merge and tasks from one ledger read
        tasks, live = snapshot.tasks, snapshot.live
        await asyncio.to_thread(self.store.verify, live, *tasks)  # nothing damaged goes live
        if self.weights is not None:
            await self.weights.serve(live, tasks, self.adapters.load)
            self.status.weights = {
                k: v for k, v in self.weights.status.__dict__.items() if k != "corrections"
            }
            self.status.corrections = self.weights.status.corrections
            self._served(live, tasks)
            return
        routes: list[Route] = []
        for task in tasks:  # load everything first, flip aliases only when all loaded
            handle = await self._load_task(task)
            routes.append(Route(task.name, handle, RouteKind.task, relative_error=_approximation(handle)))
        if live is not None:
            handle = await self._load_merge(live)
            routes.append(
                Route(CONTINUAL, handle, RouteKind.continual, relative_error=_approximation(handle))
            )
        else:
            routes.append(Route(CONTINUAL, None, RouteKind.continual))
        self.registry.replace_routes(routes)
        self._served(live, tasks)

    def _served(self, live: MergeRecord | None, tasks: list[TaskRecord]) -> None:
        self.status.live_merge = live.id if live else None
        self.status.tasks = [t.id for t in tasks]
        self._serving = (self.status.live_merge, tuple(self.status.tasks))
        if self.router is not None:
            # a task's own adapter is exact unless weights serving holds a dense merge, where
            # each task is a truncated SVD of a full-rank correction (its prompts go to the merge)
            exact = self.weights is None or live is None or live.kind == "lora"
            self.router.follow({t.name: t.meta for t in tasks}, tasks_exact=exact)
        self.metrics.serving(live)
        self.metrics.evaluated(tasks)
        self.metrics.approximations(self.registry.routes())

    async def _load_task(self, task: TaskRecord) -> AdapterHandle:
        """A task's model (:attr:`TaskRecord.serving_path`); one above the engine's rank, which a
        task served as learned on top of many predecessors can be, as its rank-R SVD."""
        name, path = f"{task.name}@v{task.version}", task.serving_path
        rank = int(task.meta.get("as_learned_rank" if path != task.path else "rank", 0))
        if rank <= self.max_lora_rank:
            return await self.adapters.load(name, path)
        svd_name = f"{name}-svd{self.max_lora_rank}"
        if (loaded := self.adapters.get(svd_name)) is not None:
            return loaded
        label = f"{task.name}-v{task.version}-{task.content_id}"
        svd_path = await asyncio.to_thread(
            self._export_svd, label, lambda: DenseDelta(LoraAdapter.load_peft(path).deltas())
        )
        return await self.adapters.load(svd_name, svd_path)

    async def _load_merge(self, merge: MergeRecord) -> AdapterHandle:
        if merge.kind == "lora":
            rank = int(merge.meta.get("rank", 0))
            if rank > self.max_lora_rank:
                raise ValueError(f"merge {merge.id} has rank {rank} > max_lora_rank {self.max_lora_rank}")
            return await self.adapters.load(f"{CONTINUAL}@{merge.id}", merge.path)
        name = f"{CONTINUAL}@{merge.id}-svd{self.max_lora_rank}"
        if (loaded := self.adapters.get(name)) is not None:
            return loaded
        if merge.meta.get("svd_rank") == self.max_lora_rank:  # the store wrote this export
            self.status.svd_relative_error = float(merge.meta["svd_relative_error"])
            return await self.adapters.load(name, merge.path)
        path = await asyncio.to_thread(
            self._export_svd, f"{merge.id}-{merge.content_id}", lambda: DenseDelta.load(merge.path)
        )
        self.status.svd_relative_error = _svd_error(path)
        return await self.adapters.load(name, path)

    def _export_svd(self, label: str, load: Callable[[], DenseDelta]) -> Path:
        """Write a dense update's rank-R approximation once, atomically, into the cache.

        ``label`` carries the version's content digest: ids restart in every store."""
        target = self.cache_dir / "svd" / f"{label}-svd{self.max_lora_rank}"
        if not target.exists():
            delta = load()
            adapter, error = delta.to_lora_svd(self.max_lora_rank)

            def fill(tmp: Path) -> None:
                adapter.save_peft(tmp, base_model=self.store.base_model)
                (tmp / "svd_error.txt").write_text(f"{error:.6g}\n")

            write_cached(target, fill)
            log.info("%s served at rank %d, relative error %.4f", label, self.max_lora_rank, error)
        return target

    async def _unload_unused(self) -> None:
        """Unload the adapters no route and no request uses any more (requests that held a
        swapped-out version finish after the sync that swapped it)."""
        async with self._lock:
            await self.adapters.unload_unused(self.registry.in_use)

    # --- following the store -----------------------------------------------------------------

    async def follow(self) -> None:
        """Sync now, then after every store change, until cancelled. Redis events make the
        swap immediate; polling the ledger catches anything an event missed; a failed sync
        is retried with a growing delay (:func:`retry_delay`) even when nothing changes."""
        watcher = LedgerWatcher(self.store, interval_s=self.poll_interval_s)
        retry_at = None if await self.sync() else time.monotonic() + (self.status.retry_in_s or 0)
        nudged = asyncio.Event()
        stop = threading.Event()
        listener = self._listen_for_events(nudged, stop) if self.events_url else None
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(nudged.wait(), timeout=self.poll_interval_s)
                changed = await asyncio.to_thread(watcher.poll)  # a database read, off the loop
                due = retry_at is not None and time.monotonic() >= retry_at
                if nudged.is_set() or changed or due:
                    nudged.clear()
                    in_step = await self.sync()
                    retry_at = None if in_step else time.monotonic() + (self.status.retry_in_s or 0)
                else:  # requests that held a swapped-out version may have finished
                    await self._unload_unused()
        finally:
            stop.set()
            if listener is not None:
                listener.join(timeout=5)

    events: EventFollower | None = None  # None: no Redis configured, the ledger poll alone

    def _listen_for_events(self, nudged: asyncio.Event, stop: threading.Event) -> threading.Thread:
        loop = asyncio.get_running_loop()
        assert self.events_url is not None
        self.events = EventFollower(
            self.events_url, self.store.location, lambda: loop.call_soon_threadsafe(nudged.set)
        )
        return self.events.start(stop)


def retry_delay(poll_interval_s: float, failures: int, ceiling_s: float = 30.0) -> float:
    """How long a replica waits before retrying a failed sync: doubling from the poll interval,
    at most ``ceiling_s``, so a damaged file is not re-read many times a second and a passing
    fault (a slow disk, an engine busy loading) heals within half a minute."""
    return min(ceiling_s, poll_interval_s * 2 ** (failures - 1))


def _approximation(handle: AdapterHandle) -> float | None:
    """The relative error of a truncated SVD that serves a model in ``lora`` serving (None: exact),
    said in the log on every sync that serves it."""
    path = Path(handle.path)
    if (path / "svd_error.txt").exists():
        error = _svd_error(path)
    elif (path / "meta.json").exists() and "svd_relative_error" in (
        meta := json.loads((path / "meta.json").read_text())
    ):
        error = float(meta["svd_relative_error"])  # a dense merge's own export
    else:
        return None
    log.warning("%s is served approximately: a truncated SVD, relative error %.4g", handle.name, error)
    return error


def _svd_error(exported: Path) -> float:
    """The relative Frobenius error an SVD export recorded (:meth:`DenseDelta.to_lora_svd`)."""
    return float((exported / "svd_error.txt").read_text())
