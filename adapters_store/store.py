"""The adapter store: immutable task and merge versions in a directory, plus an append-only ledger.

Layout under the root::

    store.json                 base-model fingerprint, fixed when the store is created
    ledger.jsonl               append-only; the only truth about task order and what is live
    tasks/<name>/v<k>/         PEFT layout (+ masks.safetensors) and meta.json
    merges/m<seq>/             PEFT layout (LoRA merges), or delta.safetensors (dense) plus its
                               rank-``dense_export_rank`` SVD in PEFT layout; meta.json

Why this shape:

- Versions never change once visible. Each is written under a hidden temporary sibling and
  ``os.rename``d into place, so a reader (a server replica, vLLM loading a path) sees a whole
  version or none.
- A version only *counts* once the ledger names it. A crash after the rename but before the
  ledger append leaves an orphan directory that no reader looks at, and the next version
  number skips it.
- The live task set is, by definition, the parents of the live merge (the last ``set_live``
  entry). Publishing, removing a task and rolling back are therefore all "write a merge, then
  append ``set_live``"; the ledger keeps the whole history and ``rollback`` is one entry.
- Writers of one store serialize on an exclusive ``fcntl`` lock on ``.lock`` (the trainer also
  holds a Redis lock per store; this one protects against anything else). Readers take no lock.

:class:`Store` is the interface the server and trainer should type against; :class:`AdapterStore`
is the local implementation. An fsspec-backed one would keep the same ledger semantics
(conditional writes instead of ``flock``/``rename``) and cache versions locally for vLLM.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from adapters_store.lora import LoraAdapter
from adapters_store.merges import DenseDelta, MergeResult, build_merge, get_merge
from adapters_store.subspace import Subspace

log = logging.getLogger(__name__)

STORE_FILE = "store.json"
LEDGER_FILE = "ledger.jsonl"
LOCK_FILE = ".lock"
META_FILE = "meta.json"
STORE_FORMAT = 1
AS_LEARNED_DIR = "as_learned"  # inside a task version: base + its predecessors + it, as one LoRA

# ASCII only (no look-alikes), no separators, no "." so never "..": a name is always one
# plain path component under tasks/.
TASK_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}", re.ASCII)
_TASK_ID = re.compile(r"(?P<name>[a-z0-9][a-z0-9_-]{0,63})/v(?P<version>[1-9][0-9]*)", re.ASCII)
_MERGE_ID = re.compile(r"m[1-9][0-9]*", re.ASCII)


class StoreError(Exception):
    """Base class of the store's refusals."""


class InvalidTaskName(StoreError, ValueError):
    """Task names must match ``[a-z0-9][a-z0-9_-]{0,63}``."""


class TaskExists(StoreError):
    """A live task already has this name (remove it first)."""


class TaskNotFound(StoreError, LookupError):
    """No live task has this name."""


class MergeNotFound(StoreError, LookupError):
    """No merge version with this id was ever made live."""


class FingerprintMismatch(StoreError):
    """The store (or an adapter's meta) belongs to a different base model."""


@dataclass(frozen=True)
class TaskRecord:
    """One immutable task version."""

    name: str
    version: int
    path: Path  # directory in PEFT layout: load it with LoraAdapter.load_peft or vLLM
    meta: dict[str, Any]

    @property
    def id(self) -> str:
        return f"{self.name}/v{self.version}"

    @property
    def serving_path(self) -> Path:
        """What ``model=<task>`` serves: the task's own adapter, or, for methods that train each
        task on top of its predecessors, the model as it was when this task was learned."""
        as_learned = self.path / AS_LEARNED_DIR
        return as_learned if as_learned.is_dir() else self.path


@dataclass(frozen=True)
class MergeRecord:
    """One immutable merge version: what the continual model serves when it is live."""

    id: str  # "m<seq>"
    kind: Literal["lora", "dense"]
    method: str  # the registered merge, e.g. "concat"
    path: Path  # PEFT layout; a dense merge also holds delta.safetensors, its PEFT files its SVD
    parents: tuple[str, ...]  # task version ids, oldest first
    meta: dict[str, Any]


@dataclass(frozen=True)
class Publication:
    """What :meth:`AdapterStore.publish` made: the task version and the new live merge."""

    task: TaskRecord
    merge: MergeRecord


class Store(Protocol):
    """The store interface the server and the trainer use."""

    fingerprint: str

    def publish(
        self,
        name: str,
        adapter: LoraAdapter,
        meta: dict[str, Any],
        merge: str,
        weights: list[float] | None = None,
        notes: list[dict[str, Any]] | None = None,
        subspace: Subspace | None = None,
        as_learned: bool = False,
    ) -> Publication: ...
    def tasks(self) -> list[TaskRecord]: ...
    def task_adapter(self, name: str) -> LoraAdapter: ...
    def history(self) -> list[LoraAdapter]: ...
    def live(self) -> MergeRecord | None: ...
    def subspace(self) -> Subspace | None: ...
    def merge(self, merge_id: str) -> MergeRecord: ...
    def load_merge(self, merge_id: str) -> MergeResult: ...
    def ledger(self) -> list[dict[str, Any]]: ...
    def rollback(self, merge_id: str) -> MergeRecord: ...
    def remove_task(self, name: str) -> MergeRecord | None: ...


def check_task_name(name: str) -> str:
    """Return ``name`` if it is a valid task name, else raise :class:`InvalidTaskName`."""
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        raise InvalidTaskName(f"task name {name!r} must match [a-z0-9][a-z0-9_-]{{0,63}}")
    return name


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class AdapterStore:
    """A store in a local directory. Cheap to construct; every reader re-reads the ledger,
    so one instance follows changes made by other processes.

    ``on_event`` is called after each change with its ``set_live`` ledger entry (plus the
    store root), e.g. :func:`adapters_store.events.redis_notifier`; its failures are logged,
    never raised, because the ledger is already written and servers also poll it.

    ``base_model`` is what every ``adapter_config.json`` names as ``base_model_name_or_path``:
    the model as the user named it (a catalogue name, the embedded model's name), never a local
    directory, so a version copied elsewhere still says which model it belongs to.
    ``dense_export_rank`` is the rank of the PEFT-layout SVD written beside every dense merge
    (:meth:`DenseDelta.to_lora_svd`), so that PEFT and vLLM load those versions too; servers
    whose ``max_lora_rank`` equals it serve that export as it is.
    """

    def __init__(
        self,
        root: str | Path,
        fingerprint: str,
        *,
        base_model: str = "",
        dense_export_rank: int = 64,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        if dense_export_rank < 1:
            raise ValueError(f"dense_export_rank must be >= 1, got {dense_export_rank}")
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.base_model = base_model  # written into adapter_config.json for PEFT/vLLM
        self.dense_export_rank = dense_export_rank
        self._on_event = on_event
        self._ledger = _Ledger(self.root / LEDGER_FILE)
        for sub in ("tasks", "merges"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._open_or_create()

    # --- writers -------------------------------------------------------------------------

    def publish(
        self,
        name: str,
        adapter: LoraAdapter,
        meta: dict[str, Any],
        merge: str,
        weights: list[float] | None = None,
        notes: list[dict[str, Any]] | None = None,
        subspace: Subspace | None = None,
        as_learned: bool = False,
    ) -> Publication:
        """Add a task version and make the merge of all live tasks plus it live.

        ``notes`` are extra ledger entries written in the same append, before ``add_task``
        (e.g. a LoRAF store growing its rank). ``subspace`` (inflora) is the protected input
        basis of the new merge, written into it. ``as_learned`` also writes, inside the task
        version, the concat of the live tasks and this one: the model this task was trained in,
        which methods that stack the earlier tasks in the forward pass serve as ``model=<task>``.

        ``merge`` names a registered merge; ``weights`` (one per live task, oldest first,
        this task last) are recorded and apply to this merge only. The magnitude merge
        folds the new task into the live dense merge instead of rebuilding it.
        """
        check_task_name(name)
        method = get_merge(merge)
        if meta.get("base_fingerprint", self.fingerprint) != self.fingerprint:
            raise FingerprintMismatch(
                f"adapter was trained on base {meta['base_fingerprint']}, store is {self.fingerprint}"
            )
        json.dumps(meta)  # refuse unserializable meta before anything is written
        with self._writer_lock():
            live, tasks = self._state()
            if any(t.name == name for t in tasks):
                raise TaskExists(f"task {name!r} is live; remove it before publishing it again")
            version = self._next_number(self.root / "tasks" / name, "v")
            task_id = f"{name}/v{version}"
            fold = method.incremental and live is not None and live.method == merge
            history = self._load_tasks(tasks) if as_learned or not fold else []
            if fold:
                assert live is not None
                result = build_merge(merge, [adapter], weights, DenseDelta.load(live.path))
                based_on = live.id
            else:
                result = build_merge(merge, [*history, adapter], weights)
                based_on = None
            prefix = build_merge("concat", [*history, adapter]) if as_learned else None
            task_meta = {
                **meta,
                "task": name,
                "version": version,
                "base_fingerprint": self.fingerprint,
                "rank": adapter.rank,
                "target_modules": adapter.target_modules,
                "created_at": _now(),
            }
            parents = [*(t.id for t in tasks), task_id]
            written: list[Path] = []
            try:
                task_dir = self.root / "tasks" / name / f"v{version}"
                self._write_version(task_dir, lambda d: self._write_task(d, adapter, task_meta, prefix))
                written.append(task_dir)
                merge_id, merge_dir = self._write_merge(result, merge, parents, weights, based_on, subspace)
                written.append(merge_dir)
                entries = self._ledger.append(
                    [
                        *(notes or []),
                        {"op": "add_task", "task": name, "version": version, "id": task_id},
                        {"op": "set_live", "merge": merge_id, "parents": parents, "cause": "add_task"},
                    ]
                )
            except BaseException:
                for path in written:
                    shutil.rmtree(path, ignore_errors=True)
                raise
        self._notify(entries[-1])
        return Publication(task=self._task_record(task_id), merge=self.merge(merge_id))

    def rollback(self, merge_id: str) -> MergeRecord:
        """Make an earlier live merge live again (its parents become the live tasks)."""
        with self._writer_lock():
            record = self.merge(merge_id)
            if record.meta.get("base_fingerprint") != self.fingerprint:
                raise FingerprintMismatch(f"merge {merge_id} was built on another base model")
            live, _ = self._state()
            if live is not None and live.id == merge_id:
                return record
            entries = self._ledger.append(
                [
                    {"op": "rollback", "merge": merge_id, "from": live.id if live else None},
                    {
                        "op": "set_live",
                        "merge": merge_id,
                        "parents": list(record.parents),
                        "cause": "rollback",
                    },
                ]
            )
        self._notify(entries[-1])
        return record

    def remove_task(self, name: str) -> MergeRecord | None:
        """Rebuild the live merge without task ``name`` and make it live.

        Returns the new merge, or None when no task is left (the base model alone is live).
        The task's version stays on disk and in the ledger, so a rollback can bring it back.
        """
        check_task_name(name)
        with self._writer_lock():
            live, tasks = self._state()
            index = next((i for i, t in enumerate(tasks) if t.name == name), None)
            if index is None or live is None:
                raise TaskNotFound(f"no live task {name!r}")
            remaining = tasks[:index] + tasks[index + 1 :]
            weights = live.meta.get("weights")
            if weights is not None:
                weights = weights[:index] + weights[index + 1 :]
            parents = [t.id for t in remaining]
            merge_id: str | None = None
            merge_dir: Path | None = None
            try:
                if remaining:
                    result = build_merge(live.method, self._load_tasks(remaining), weights)
                    # The removed task's directions stay reserved: the later tasks' inputs may
                    # lie in them too (they were never added twice), so only a superset is safe.
                    kept = Subspace.load(live.path).unchanged() if Subspace.exists(live.path) else None
                    merge_id, merge_dir = self._write_merge(result, live.method, parents, weights, None, kept)
                entries = self._ledger.append(
                    [
                        {"op": "remove_task", "task": name, "id": tasks[index].id},
                        {"op": "set_live", "merge": merge_id, "parents": parents, "cause": "remove_task"},
                    ]
                )
            except BaseException:
                if merge_dir is not None:
                    shutil.rmtree(merge_dir, ignore_errors=True)
                raise
        self._notify(entries[-1])
        return self.merge(merge_id) if merge_id else None

    # --- readers -------------------------------------------------------------------------

    def tasks(self) -> list[TaskRecord]:
        """Live tasks, oldest first."""
        return self._state()[1]

    def task_adapter(self, name: str) -> LoraAdapter:
        """The live version of task ``name``, masks included."""
        for task in self.tasks():
            if task.name == name:
                return LoraAdapter.load_peft(task.path)
        raise TaskNotFound(f"no live task {name!r}")

    def task_versions(self, name: str) -> list[TaskRecord]:
        """Every version of ``name`` ever published, live or not, oldest first."""
        check_task_name(name)
        ids = [e["id"] for e in self._ledger.read() if e["op"] == "add_task" and e["task"] == name]
        return [self._task_record(task_id) for task_id in ids]

    def history(self) -> list[LoraAdapter]:
        """The live task adapters, oldest first: what the trainer needs for the next task."""
        return self._load_tasks(self.tasks())

    def live(self) -> MergeRecord | None:
        """The live merge, or None when no task is live (serve the base model)."""
        return self._state()[0]

    def subspace(self) -> Subspace | None:
        """The live merge's protected input subspace (inflora), or None when it has none."""
        live = self.live()
        return Subspace.load(live.path) if live is not None and Subspace.exists(live.path) else None

    def merge(self, merge_id: str) -> MergeRecord:
        """A merge version that the ledger has made live at some point."""
        if not isinstance(merge_id, str) or not _MERGE_ID.fullmatch(merge_id):
            raise MergeNotFound(f"not a merge id: {merge_id!r}")
        path = self.root / "merges" / merge_id
        if not (path / META_FILE).is_file() or merge_id not in self._ledger_merge_ids():
            raise MergeNotFound(f"no merge {merge_id} in the ledger")
        meta = json.loads((path / META_FILE).read_text())
        return MergeRecord(merge_id, meta["kind"], meta["merge"], path, tuple(meta["parents"]), meta)

    def merges(self) -> list[MergeRecord]:
        """Every merge that has been live, in the order it first became live."""
        return [self.merge(merge_id) for merge_id in self._ledger_merge_ids()]

    def load_merge(self, merge_id: str) -> MergeResult:
        record = self.merge(merge_id)
        if record.kind == "dense":
            return DenseDelta.load(record.path)
        return LoraAdapter.load_peft(record.path)

    def ledger(self) -> list[dict[str, Any]]:
        return self._ledger.read()

    # --- internals -----------------------------------------------------------------------

    def _open_or_create(self) -> None:
        """Record the fingerprint at creation; refuse to open a store of another base model."""
        path = self.root / STORE_FILE
        if not path.exists():
            info = {"format": STORE_FORMAT, "fingerprint": self.fingerprint, "created_at": _now()}
            tmp = path.with_name(f".{STORE_FILE}.{uuid.uuid4().hex}")
            tmp.write_text(json.dumps(info, indent=2))
            try:
                os.link(tmp, path)  # atomic and exclusive: a concurrent creator's file wins whole
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        recorded = json.loads(path.read_text())["fingerprint"]
        if recorded != self.fingerprint:
            raise FingerprintMismatch(
                f"store {self.root} is for base {recorded}, opened with {self.fingerprint}"
            )

    @contextmanager
    def _writer_lock(self) -> Iterator[None]:
        with (self.root / LOCK_FILE).open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _state(self) -> tuple[MergeRecord | None, list[TaskRecord]]:
        """Replay the ledger: the last set_live names the live merge and the live tasks."""
        last = None
        for entry in self._ledger.read():
            if entry["op"] == "set_live":
                last = entry
        if last is None:
            return None, []
        tasks = [self._task_record(task_id) for task_id in last["parents"]]
        return (self.merge(last["merge"]) if last["merge"] else None), tasks

    def _ledger_merge_ids(self) -> list[str]:
        ids = [e["merge"] for e in self._ledger.read() if e["op"] == "set_live" and e["merge"]]
        return list(dict.fromkeys(ids))

    def _task_record(self, task_id: str) -> TaskRecord:
        match = _TASK_ID.fullmatch(task_id)
        if match is None:
            raise TaskNotFound(f"not a task version id: {task_id!r}")
        name, version = match["name"], int(match["version"])
        path = self.root / "tasks" / name / f"v{version}"
        return TaskRecord(name, version, path, json.loads((path / META_FILE).read_text()))

    @staticmethod
    def _load_tasks(tasks: list[TaskRecord]) -> list[LoraAdapter]:
        return [LoraAdapter.load_peft(t.path) for t in tasks]

    @staticmethod
    def _next_number(parent: Path, prefix: str) -> int:
        """1 + the largest ``<prefix><k>`` in ``parent``, orphans included (never reuse a name)."""
        taken = [
            int(p.name[len(prefix) :]) for p in parent.glob(f"{prefix}*") if p.name[len(prefix) :].isdigit()
        ]
        return max(taken, default=0) + 1

    def _write_task(
        self, directory: Path, adapter: LoraAdapter, meta: dict[str, Any], as_learned: MergeResult | None
    ) -> None:
        adapter.save_peft(directory, base_model=self.base_model)
        if isinstance(as_learned, LoraAdapter):
            (directory / AS_LEARNED_DIR).mkdir()
            as_learned.save_peft(directory / AS_LEARNED_DIR, base_model=self.base_model)
            meta = {**meta, "as_learned_rank": as_learned.rank}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2))

    def _write_merge(
        self,
        result: MergeResult,
        method: str,
        parents: list[str],
        weights: list[float] | None,
        based_on: str | None,
        subspace: Subspace | None = None,
    ) -> tuple[str, Path]:
        """Write a merge version; ``based_on`` is the merge an incremental merge folded into."""
        merge_id = f"m{self._next_number(self.root / 'merges', 'm')}"
        meta: dict[str, Any] = {
            "id": merge_id,
            "kind": "dense" if isinstance(result, DenseDelta) else "lora",
            "merge": method,
            "parents": parents,
            "weights": weights,
            "rank": None if isinstance(result, DenseDelta) else result.rank,
            "based_on": based_on,
            "base_fingerprint": self.fingerprint,
            "created_at": _now(),
        }
        if subspace is not None:
            meta["subspace"] = subspace.summary()
        export: LoraAdapter | None = None
        if isinstance(result, DenseDelta):
            export, error = result.to_lora_svd(self.dense_export_rank)
            meta["svd_rank"], meta["svd_relative_error"] = self.dense_export_rank, error

        def write(directory: Path) -> None:
            if isinstance(result, DenseDelta):
                result.save(directory)
                assert export is not None
                export.save_peft(directory, base_model=self.base_model)
            else:
                result.save_peft(directory, base_model=self.base_model)
            if subspace is not None:
                subspace.save(directory)
            (directory / META_FILE).write_text(json.dumps(meta, indent=2))

        path = self.root / "merges" / merge_id
        self._write_version(path, write)
        return merge_id, path

    @staticmethod
    def _write_version(final: Path, write: Callable[[Path], None]) -> None:
        """Write into a hidden sibling, fsync it, then rename it to ``final`` in one step."""
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".tmp-{final.name}-{uuid.uuid4().hex}")
        tmp.mkdir()
        try:
            write(tmp)
            for file in tmp.rglob("*"):
                _fsync_path(file)
            _fsync_path(tmp)
            os.rename(tmp, final)  # fails if ``final`` exists with content: versions are never replaced
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_path(final.parent)

    def _notify(self, entry: dict[str, Any]) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event({**entry, "store": str(self.root)})
        except Exception:
            log.exception("store event for %s failed; servers will see the ledger change instead", self.root)


class _Ledger:
    """``ledger.jsonl``: one JSON object per line, each with ``seq`` and ``ts``.

    Appends hold an exclusive ``flock`` on the file, write all of one operation's entries in
    a single write and fsync, so an operation's entries appear together. A torn last line
    (a crash mid-write) is ignored by readers and cut off by the next append.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> list[dict[str, Any]]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def append(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = _read_all(fd)
            keep = data.rfind(b"\n") + 1
            if keep != len(data):
                log.warning("ledger %s: dropping a torn last line of %d bytes", self.path, len(data) - keep)
                os.ftruncate(fd, keep)
            lines = [line for line in data[:keep].splitlines() if line.strip()]
            seq = json.loads(lines[-1])["seq"] if lines else 0
            ts = _now()
            stamped = [{"seq": seq + i, "ts": ts, **entry} for i, entry in enumerate(entries, start=1)]
            payload = b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in stamped)
            try:
                os.lseek(fd, keep, os.SEEK_SET)
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except BaseException:
                os.ftruncate(fd, keep)  # all of the operation or none of it
                raise
            return stamped
        finally:
            os.close(fd)  # also releases the lock


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
