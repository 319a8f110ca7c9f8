"""Serve the live merge from the engine's weights, and every other model as a correction.

``continual`` is the model users query most, and a LoRA's per-token cost grows with its rank,
which for a concat merge grows with every task (docs/results.md, Performance). So with
``LAMINA_CONTINUAL_SERVING=weights`` (what ``auto`` means when routing is not ``task``, where
``continual`` carries the traffic) the live merge of any kind is written into the engine:
W = W0 + ΔW_live (``Engine.apply_dense_delta``), and ``continual`` runs at the base model's speed.
``base`` and each task's model stay served, as LoRA corrections relative to W
(server/swap/corrections.py): exact when their rank fits ``max_lora_rank``, otherwise truncated
SVDs whose relative error is logged and reported in ``/admin/adapters``.

A swap, in order (nothing a request can see changes before step 3):

1. build the new corrections (in a thread; cached under ``<home>/cache/corrections``, keyed by
   the merge's and the task's content digests, never by ids, which restart in every store)
   and load them into the engine beside the old ones;
2. hold new requests back and wait for the running ones to finish (``ModelRegistry.exclusive``,
   at most ``LAMINA_WEIGHTS_SWAP_DRAIN_S``);
3. write W0 + ΔW_new (rebuilt from W0 on disk, so a rollback is exact), flip every route, let
   requests in again.

A failure in 1 leaves everything as it was; a failure while writing the weights puts the
previous merge's weights back before the error is reported.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters_store.lora import LoraAdapter
from adapters_store.merges import DenseDelta
from adapters_store.store import MergeRecord, TaskRecord
from adapters_store.versions import write_version
from server.engine import AdapterHandle, Engine
from server.swap.corrections import Correction, correction
from server.swap.registry import CONTINUAL, ModelRegistry, Route, RouteKind

log = logging.getLogger(__name__)
SUMMARY_FILE = "correction.json"

Loader = Callable[[str, Path], Awaitable[AdapterHandle]]


@dataclass
class WeightsStatus:
    """What the engine's weights hold and what the last swap cost, for the admin view."""

    merge: str | None = None  # the live merge written into the weights; None: W0
    swaps: int = 0
    last_swap_s: float | None = None  # drain + write + flip
    last_drain_s: float | None = None  # waiting for running requests
    last_write_s: float | None = None  # writing the weights (and resetting the prefix cache)
    running_at_swap: int = 0  # requests that outlasted the drain and were ended (model_swapped) (0: none)
    corrections: dict[str, dict[str, Any]] = field(default_factory=dict)  # model -> Correction.summary()


class WeightsServing:
    """Keeps the engine's weights, the correction adapters and the routes in step."""

    def __init__(
        self,
        engine: Engine,
        registry: ModelRegistry,
        base_model_dir: Path,
        cache_dir: Path,
        max_lora_rank: int,
        drain_s: float,
        base_model: str,
    ) -> None:
        self.engine, self.registry = engine, registry
        self.base_model_dir, self.cache_dir = base_model_dir, cache_dir
        self.max_lora_rank, self.drain_s, self.base_model = max_lora_rank, drain_s, base_model
        self.status = WeightsStatus()
        self._written: Path | None = None  # what the weights hold over W0 (None: W0 itself)
        self._served: tuple[str | None, tuple[str, ...]] | None = None  # (merge, task ids) now served

    async def serve(self, live: MergeRecord | None, tasks: list[TaskRecord], load: Loader) -> None:
        """Make the engine serve ``live`` in its weights and ``base``/``tasks`` as corrections."""
        key = (live.id if live else None, tuple(t.id for t in tasks))
        if key == self._served:  # the ledger moved, what is live did not: nothing to read or build
            return
        routes: list[Route] = []
        corrections: dict[str, dict[str, Any]] = {}
        if live is None:
            routes.append(Route(self.registry.base_name, None, RouteKind.base))
            routes.append(Route(CONTINUAL, None, RouteKind.continual))
        else:
            delta = await asyncio.to_thread(_live_delta, live)
            targets: list[tuple[str, RouteKind, TaskRecord | None]] = [
                (self.registry.base_name, RouteKind.base, None)
            ]
            targets += [(t.name, RouteKind.task, t) for t in tasks]
            for public, kind, task in targets:
                label = f"{task.name}@v{task.version}" if task else public
                name = f"{label}~{live.id}"
                path, summary = await asyncio.to_thread(self._correction, live, label, task, delta)
                corrections[public] = {"adapter": name, **summary}
                handle = await load(name, path) if path is not None else None
                error = None if summary["exact"] else float(summary["relative_error"])
                routes.append(
                    Route(public, handle, kind, in_weights=None if handle else name, relative_error=error)
                )
            routes.append(Route(CONTINUAL, None, RouteKind.continual, in_weights=f"{CONTINUAL}@{live.id}"))
        merge = live.id if live else None
        if merge != self.status.merge:
            await self._swap(live, routes)
        else:
            self.registry.replace_routes(routes)
        self.status.corrections = corrections
        self._served = key
        keep = correction_cache_path(self.cache_dir, live, None, self.max_lora_rank).parent if live else None
        await asyncio.to_thread(evict_corrections, self.cache_dir / "corrections", keep)

    async def _swap(self, live: MergeRecord | None, routes: list[Route]) -> None:
        started = time.perf_counter()
        async with self.registry.exclusive(self.drain_s) as revoked:
            drained = time.perf_counter()
            try:
                write_s = await self.engine.apply_dense_delta(self.base_model_dir, _weights_path(live))
                self._written = _weights_path(live)
            except Exception:
                log.exception("writing %s into the weights failed; restoring %s", live, self.status.merge)
                await self._restore()
                raise
            self.registry.replace_routes(routes)
        s = self.status
        s.merge, s.swaps, s.running_at_swap = (live.id if live else None), s.swaps + 1, revoked
        s.last_swap_s, s.last_drain_s, s.last_write_s = (
            time.perf_counter() - started,
            drained - started,
            write_s,
        )
        log.info(
            "weights now hold %s: swap %.3f s (drain %.3f s, write %.3f s, %d requests ended as model_swapped)",
            s.merge or "W0", s.last_swap_s, s.last_drain_s, s.last_write_s, revoked,
        )  # fmt: skip

    async def _restore(self) -> None:
        """Write back the weights the routes still describe (the previous merge, or W0)."""
        try:
            await self.engine.apply_dense_delta(self.base_model_dir, self._written)
        except Exception:  # the engine holds neither; say so loudly, the next sync retries
            log.exception("could not restore the previous weights either")

    def _correction(
        self, merge: MergeRecord, label: str, task: TaskRecord | None, delta: LoraAdapter | DenseDelta
    ) -> tuple[Path | None, dict[str, Any]]:
        """The correction for ``task`` (None: base) under ``merge``, built once into the cache.

        Returns its PEFT directory (None when it is zero) and its summary."""
        target = correction_cache_path(self.cache_dir, merge, task, self.max_lora_rank)
        if not (target / SUMMARY_FILE).exists():
            adapter = LoraAdapter.load_peft(task.serving_path) if task else None
            fix = correction(adapter, delta, self.max_lora_rank)
            self._write(target, fix)
            _log_correction(label, merge.id, fix, self.max_lora_rank)
        summary = json.loads((target / SUMMARY_FILE).read_text())
        if not summary["exact"]:  # said on every sync that serves it, a restart included, not once per cache
            log.warning(
                "%s is served approximately under %s: a rank-%d truncated SVD of a rank-%s correction, "
                "relative error %.4g (raise LAMINA_MAX_LORA_RANK, or use a concat method, to serve it exactly)",
                label, merge.id, summary["served_rank"], summary["rank"], summary["relative_error"],
            )  # fmt: skip
        return (target if summary["served_rank"] > 0 else None), summary

    def _write(self, target: Path, fix: Correction) -> None:
        def fill(tmp: Path) -> None:
            if fix.adapter is not None:
                fix.adapter.save_peft(tmp, base_model=self.base_model)
            (tmp / SUMMARY_FILE).write_text(json.dumps(fix.summary(), indent=2))

        write_cached(target, fill)


def write_cached(target: Path, fill: Callable[[Path], None]) -> None:
    """Write a derived directory into the cache whole or not at all (a full disk leaves no
    half-written copy); a replica that renamed its identical copy first wins the race."""
    try:
        write_version(target, fill)
    except OSError:
        if not target.is_dir():
            raise


EVICT_AFTER_S = 3600.0  # another replica may still serve an older merge for a moment: keep an hour


def evict_corrections(root: Path, keep: Path | None, older_than_s: float = EVICT_AFTER_S) -> list[Path]:
    """Remove the cached corrections of merges other than ``keep`` untouched for ``older_than_s``.

    Why: a correction is as large as a rank-``max_lora_rank`` LoRA of the whole model, built for
    every task under every merge; kept forever they fill the disk. A replica that still needs an
    evicted one rebuilds it (the cache is derived data). Returns what was removed."""
    if not root.is_dir():
        return []
    if keep is not None and keep.is_dir():
        os.utime(keep)  # in use now: no other replica evicts it for another hour
    cutoff = time.time() - older_than_s
    removed = []
    for entry in root.iterdir():
        if entry == keep or not entry.is_dir():
            continue
        if entry.stat().st_mtime < cutoff:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def correction_cache_path(
    cache_dir: Path, merge: MergeRecord, task: TaskRecord | None, max_rank: int
) -> Path:
    """Where ``task``'s (None: ``base``'s) correction under ``merge`` is cached: named by both
    versions' contents, so a new store, a deleted store or another base model never meets a
    stale file (their merge ids restart at ``m1``)."""
    model = f"{task.name}-v{task.version}-{task.content_id}" if task else "base"
    return cache_dir / "corrections" / f"{merge.id}-{merge.content_id}" / f"{model}-r{max_rank}"


def _live_delta(live: MergeRecord) -> LoraAdapter | DenseDelta:
    if live.kind == "dense":
        return DenseDelta.load(live.path)
    return LoraAdapter.load_peft(live.path)


def _weights_path(live: MergeRecord | None) -> Path | None:
    """What :meth:`Engine.apply_dense_delta` reads: a dense merge's ΔW file, a LoRA merge's PEFT directory."""
    if live is None:
        return None
    return live.path / "delta.safetensors" if live.kind == "dense" else live.path


def _log_correction(label: str, merge: str, fix: Correction, max_rank: int) -> None:
    """Say once, when it is built, that a correction is exact (an approximate one is reported on
    every sync that serves it, :meth:`WeightsServing._correction`)."""
    if fix.exact:
        log.info("%s served relative to %s as an exact rank-%s correction", label, merge, fix.rank)
