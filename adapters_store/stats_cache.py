"""The stats of a store, cached per store version and updated incrementally: what
``GET /admin/stats`` serves.

Files under ``<store>/stats/`` (a cache: deleting the directory only costs a recomputation)::

    <merge>.json                 the JSON view of that live version (what the endpoint returns)
    <merge>.matrices.json        the same with per-module matrices
    <merge>.state.safetensors    the :class:`~adapters_store.stats.StoreStats` behind it, so that
                                 the next version (one task more) is an incremental update

A store version is its live merge id together with its live task ids, oldest first; both, and
the :class:`~adapters_store.stats.StatsParams`, must match for a file to be used. Files are
written to a temporary name and renamed into place, so a concurrent reader (another server
replica) sees a whole file or none; two replicas computing the same version write the same
bytes. Only the newest ``keep`` files of each kind are kept: a state file of a 7B store (q and
v of 32 layers) with 100 tasks is about 195 MiB at the default three ε levels (99 MiB with one;
the bits kept per level are counted in :mod:`adapters_store.stats`). A file of another
``STATS_SCHEMA`` is never used. A read-only store still gets its stats, uncached.

The factors are read module by module straight from the task versions' safetensors files, so
neither a full recomputation nor an update holds more than one module's factors of every task.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from adapters_store.atomic import write_atomically
from adapters_store.lora import _PEFT_PREFIX as PEFT_PREFIX
from adapters_store.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MASKS_FILE, LoraAdapter
from adapters_store.stats import (
    STATS_SCHEMA,
    Factors,
    ModuleStats,
    StatsParams,
    StoreStats,
    compute_stats,
    summary,
    update_stats,
)
from adapters_store.store import AdapterStore
from adapters_store.subspace import occupancy

log = logging.getLogger(__name__)

STATS_DIR = "stats"
STATE_SUFFIX = ".state.safetensors"
_HEADER_KEY = "lamina_stats"
_SCALAR_FIELDS = ("name", "shape", "positions", "exact", "width")


# --- reading factors lazily ----------------------------------------------------------------------


class PeftDirectorySource:
    """A :class:`~adapters_store.stats.FactorSource` over task version directories (PEFT layout,
    oldest first) that reads one module's tensors at a time (safetensors maps the files)."""

    def __init__(self, directories: list[Path]) -> None:
        self.directories = directories
        self._open: dict[int, _TaskFiles] = {}

    def __len__(self) -> int:
        return len(self.directories)

    def module_names(self) -> list[str]:
        return sorted({name for task in range(len(self)) for name in self._files(task).modules})

    def factors(self, task: int, module: str) -> Factors | None:
        files = self._files(task)
        if module not in files.modules:
            return None
        mask = files.masks.get_tensor(module).bool() if module in files.mask_names else None
        return Factors(
            A=files.weights.get_tensor(f"{PEFT_PREFIX}{module}.lora_A.weight"),
            B=files.weights.get_tensor(f"{PEFT_PREFIX}{module}.lora_B.weight"),
            scale=files.scale,
            mask=mask,
        )

    def _files(self, task: int) -> _TaskFiles:
        if task not in self._open:
            self._open[task] = _TaskFiles.open(self.directories[task])
        return self._open[task]


@dataclass
class _TaskFiles:
    """One task version's open safetensors files (memory-mapped; read per tensor)."""

    weights: Any
    masks: Any
    scale: float
    modules: set[str]
    mask_names: set[str]

    @classmethod
    def open(cls, directory: Path) -> _TaskFiles:
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
        weights = safe_open(str(directory / ADAPTER_WEIGHTS), framework="pt")
        suffix = ".lora_A.weight"
        keys = list(weights.keys())  # a safe_open handle is not iterable itself
        modules = {k.removeprefix(PEFT_PREFIX).removesuffix(suffix) for k in keys if k.endswith(suffix)}
        masks = (
            safe_open(str(directory / MASKS_FILE), framework="pt")
            if (directory / MASKS_FILE).exists()
            else None
        )
        return cls(
            weights=weights,
            masks=masks,
            scale=float(config["lora_alpha"]) / float(config["r"]),
            modules=modules,
            mask_names=set(masks.keys()) if masks is not None else set(),
        )


# --- the state file ------------------------------------------------------------------------------


def _array_fields() -> list[str]:
    return [f.name for f in fields(ModuleStats) if f.name not in _SCALAR_FIELDS]


def save_state(path: Path, stats: StoreStats, version: dict[str, Any]) -> None:
    """Write ``stats`` (every array of every module) to one safetensors file, atomically."""
    tensors: dict[str, np.ndarray] = {}
    modules: dict[str, dict[str, Any]] = {}
    for name, module in stats.modules.items():
        modules[name] = {key: getattr(module, key) for key in _SCALAR_FIELDS}
        for key in _array_fields():
            tensors[f"{name}/{key}"] = np.ascontiguousarray(getattr(module, key))
    header = {
        "schema": STATS_SCHEMA,
        "params": stats.params.as_dict(),
        "tasks": list(stats.tasks),
        "version": version,
        "modules": modules,
    }
    write_atomically(
        path, lambda tmp: save_file(tensors, str(tmp), metadata={_HEADER_KEY: json.dumps(header)})
    )


def read_state_header(path: Path) -> dict[str, Any] | None:
    """The header of a state file (cheap: the tensors are not read); None if unreadable."""
    try:
        with safe_open(str(path), framework="np") as f:
            return json.loads((f.metadata() or {})[_HEADER_KEY])
    except (OSError, KeyError, ValueError, json.JSONDecodeError):
        return None


def load_state(path: Path) -> StoreStats:
    header = read_state_header(path)
    if header is None or header.get("schema") != STATS_SCHEMA:
        raise ValueError(f"{path} is not a stats state of schema {STATS_SCHEMA}")
    modules: dict[str, ModuleStats] = {}
    with safe_open(str(path), framework="np") as f:
        for name, scalars in header["modules"].items():
            arrays = {key: f.get_tensor(f"{name}/{key}") for key in _array_fields()}
            scalars = {**scalars, "shape": tuple(scalars["shape"])}
            modules[name] = ModuleStats(**scalars, **arrays)
    return StoreStats(StatsParams(**header["params"]), tuple(header["tasks"]), modules)


# --- the store entry point -----------------------------------------------------------------------


def stats_for_store(
    store: AdapterStore,
    params: StatsParams | None = None,
    *,
    module_matrices: bool = False,
    keep: int = 4,
) -> dict[str, Any]:
    """The JSON view of the store's live version (schema: :func:`adapters_store.stats.summary`),
    plus ``store_version`` ({merge, tasks}), ``computed`` ({mode: full | incremental, seconds,
    at}) and ``cache_hit``.

    Served from ``<store>/stats/`` when this version was computed before; computed incrementally
    when the cache holds the state of the same tasks minus the newest one (a publish); from
    scratch otherwise (first call, after a removal or a rollback to an evicted version). This
    may take seconds on a large store: call it off the event loop.
    """
    params = params or StatsParams()
    live, tasks = store.live(), store.tasks()
    ids = [task.id for task in tasks]
    version = {"merge": live.id if live else None, "tasks": ids}
    if live is None or not tasks:
        empty = summary(StoreStats(params, (), {}), module_matrices=module_matrices)
        return {**empty, "store_version": version, "computed": None, "cache_hit": False, "subspace": None}
    # inflora's reserved input directions: read from the merge's meta, nothing to compute or cache.
    protected = {"subspace": occupancy(live.meta["subspace"]) if live.meta.get("subspace") else None}

    directory = store.root / STATS_DIR
    view_path = directory / f"{live.id}{'.matrices' if module_matrices else ''}.json"
    cached = _read_view(view_path, version, params)
    if cached is not None:
        return {**cached, "cache_hit": True, **protected}

    start = time.perf_counter()
    previous = _find_state(directory, ids[:-1], params)
    if previous is not None:
        earlier = PeftDirectorySource([task.path for task in tasks[:-1]])
        stats = update_stats(previous, earlier, LoraAdapter.load_peft(tasks[-1].path), ids[-1])
        mode = "incremental"
    else:
        stats = compute_stats(PeftDirectorySource([task.path for task in tasks]), ids, params)
        mode = "full"
    view = {
        **summary(stats, module_matrices=module_matrices),
        "store_version": version,
        "computed": {
            "mode": mode,
            "seconds": round(time.perf_counter() - start, 3),
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    }
    try:
        directory.mkdir(exist_ok=True)
        save_state(directory / f"{live.id}{STATE_SUFFIX}", stats, version)
        write_atomically(view_path, lambda tmp: tmp.write_text(json.dumps(view)))
        _prune(directory, keep)
    except Exception:  # a cache that cannot be written (read-only store, full disk) must not fail the request
        log.warning("could not cache stats under %s; serving them uncached", directory, exc_info=True)
    return {**view, "cache_hit": False, **protected}


def _read_view(path: Path, version: dict[str, Any], params: StatsParams) -> dict[str, Any] | None:
    try:
        view = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if (
        view.get("schema") != STATS_SCHEMA
        or view.get("store_version") != version
        or view.get("params") != params.as_dict()
    ):
        return None
    return view


def _find_state(directory: Path, tasks: list[str], params: StatsParams) -> StoreStats | None:
    """A cached state of exactly ``tasks`` with ``params``, if any (newest first)."""
    if not tasks or not directory.is_dir():
        return None
    for path in sorted(directory.glob(f"*{STATE_SUFFIX}"), key=_mtime, reverse=True):
        header = read_state_header(path)
        if (
            header
            and header.get("schema") == STATS_SCHEMA
            and header["tasks"] == tasks
            and header["params"] == params.as_dict()
        ):
            try:
                return load_state(path)
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("ignoring unreadable stats state %s", path, exc_info=True)
    return None


def _prune(directory: Path, keep: int) -> None:
    """Keep the newest ``keep`` files of each kind (state, view, view with matrices)."""
    kinds = [
        sorted(directory.glob(f"*{STATE_SUFFIX}"), key=_mtime, reverse=True),
        sorted(directory.glob("m*[0-9].json"), key=_mtime, reverse=True),
        sorted(directory.glob("*.matrices.json"), key=_mtime, reverse=True),
    ]
    for files in kinds:
        for path in files[keep:]:
            path.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


__all__ = [
    "PeftDirectorySource",
    "load_state",
    "read_state_header",
    "save_state",
    "stats_for_store",
]
