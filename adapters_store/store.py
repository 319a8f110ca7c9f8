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
- The ledger entry that names a version also records the sha256 of each of its files
  (:mod:`adapters_store.integrity`); a version whose files differ, or that names another base
  model, is refused wherever it would be read (:meth:`AdapterStore.verify`).
- The live task set is, by definition, the parents of the live merge (the last ``set_live``
  entry). Publishing, removing a task and rolling back are therefore all "write a merge, then
  append ``set_live``"; the ledger keeps the whole history and ``rollback`` is one entry.
- Writers of one store serialize on the ledger backend's writer lock: an exclusive ``fcntl``
  lock on ``.lock`` here, an advisory lock in PostgreSQL (the trainer also holds a Redis lock per
  store; this one protects against anything else). Readers take no lock.
  A publisher that holds a lease elsewhere passes a :class:`Fence`, checked under this lock just
  before the ledger append, so a publisher whose lease lapsed (a stalled worker) writes nothing.

:class:`Store` is the interface the server and trainer should type against. Where the ledger
and the files live is chosen at construction: the ledger in this directory
(:class:`adapters_store.ledger.FileLedger`, the default) or in PostgreSQL
(:class:`adapters_store.ledger_database.DatabaseLedger`); the files here only, or also in object
storage (:class:`adapters_store.blobs.ObjectStorage`), in which case this directory is the
process's local, verified copy of the versions it reads.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from safetensors import safe_open

from adapters_store.blobs import ObjectStorage
from adapters_store.errors import CorruptVersion as CorruptVersion
from adapters_store.errors import DiskFull as DiskFull
from adapters_store.errors import FenceLost as FenceLost
from adapters_store.errors import FingerprintMismatch as FingerprintMismatch
from adapters_store.errors import InvalidTaskName as InvalidTaskName
from adapters_store.errors import LiveChanged as LiveChanged
from adapters_store.errors import MergeNotFound as MergeNotFound
from adapters_store.errors import StoreError as StoreError
from adapters_store.errors import TaskExists as TaskExists
from adapters_store.errors import TaskNotFound as TaskNotFound
from adapters_store.errors import raise_if_disk_full
from adapters_store.integrity import verify_tree
from adapters_store.interface import Fence as Fence
from adapters_store.interface import Store as Store
from adapters_store.interface import check_fence
from adapters_store.ledger import LEDGER_FILE as LEDGER_FILE
from adapters_store.ledger import LOCK_FILE as LOCK_FILE
from adapters_store.ledger import STORE_FILE as STORE_FILE
from adapters_store.ledger import FileLedger, LedgerBackend
from adapters_store.ledger import now as _now
from adapters_store.lora import LoraAdapter
from adapters_store.merges import DenseDelta, MergeResult, build_merge, get_merge
from adapters_store.subspace import SUBSPACE_FILE, Subspace
from adapters_store.versions import AS_LEARNED_DIR as AS_LEARNED_DIR
from adapters_store.versions import META_FILE as META_FILE
from adapters_store.versions import MergeRecord as MergeRecord
from adapters_store.versions import Publication as Publication
from adapters_store.versions import StoreSnapshot as StoreSnapshot
from adapters_store.versions import TaskRecord as TaskRecord
from adapters_store.versions import (
    merge_ids,
    merge_record,
    next_number,
    recorded_files,
    task_record,
    write_merge,
    write_task,
)

log = logging.getLogger(__name__)

# ASCII only (no look-alikes), no separators, no "." so never "..": a name is always one
# plain path component under tasks/.
TASK_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}", re.ASCII)


def check_task_name(name: str) -> str:
    """Return ``name`` if it is a valid task name, else raise :class:`InvalidTaskName`."""
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        raise InvalidTaskName(f"task name {name!r} must match [a-z0-9][a-z0-9_-]{{0,63}}")
    return name


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

    Writers take ``notes``: extra ledger entries written in the same append as the change (LoRAF
    rank growth, the admin audit), so a change and its record land together or not at all.

    ``ledger`` (default: the files in ``root``) and ``objects`` (default: none, the files live in
    ``root`` only) choose the backends; ``location`` is the store's name shared by every process
    that opens it (events and locks are keyed by it), ``root`` by default.
    """

    def __init__(
        self,
        root: str | Path,
        fingerprint: str,
        *,
        base_model: str = "",
        dense_export_rank: int = 64,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        ledger: LedgerBackend | None = None,
        objects: ObjectStorage | None = None,
        location: str | None = None,
    ) -> None:
        if dense_export_rank < 1:
            raise ValueError(f"dense_export_rank must be >= 1, got {dense_export_rank}")
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.base_model = base_model  # written into adapter_config.json for PEFT/vLLM
        self.dense_export_rank = dense_export_rank
        self._on_event = on_event
        self.location = location or str(self.root)
        self._objects = objects
        for sub in ("tasks", "merges"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._ledger: LedgerBackend = ledger or FileLedger(self.root)
        recorded = self._ledger.bind(fingerprint)
        if recorded != fingerprint:
            raise FingerprintMismatch(
                f"store {self.location} is for base {recorded}, opened with {fingerprint}"
            )

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
        fence: Fence | None = None,
        trained_on: tuple[str, ...] | None = None,
        own_model: LoraAdapter | None = None,
    ) -> Publication:
        """Add a task version and make the merge of all live tasks plus it live.

        ``notes`` are extra ledger entries written in the same append, before ``add_task``
        (e.g. a LoRAF store growing its rank). ``subspace`` (inflora) is the protected input
        basis of the new merge, written into it. ``as_learned`` also writes, inside the task
        version, the concat of the live tasks and this one: the model this task was trained in,
        which methods that stack the earlier tasks in the forward pass serve as ``model=<task>``.
        ``own_model`` (``own-lora``) is what ``model=<task>`` serves instead when the merge
        receives only part of the task (``adapter``): it is written there in place of the concat.

        ``merge`` names a registered merge; ``weights`` (one per live task, oldest first,
        this task last) are recorded and apply to this merge only. The magnitude merge
        folds the new task into the live dense merge instead of rebuilding it.

        ``fence`` (a worker's claim on its job) is checked under the writer lock before any
        work and again just before the ledger append: :class:`FenceLost` when it no longer
        holds. ``trained_on`` (the live task ids the adapter was trained after) must still be
        the live tasks: :class:`LiveChanged` when an admin action changed them meanwhile. A full
        disk raises :class:`DiskFull`. Either way nothing is left behind.
        """
        check_task_name(name)
        if as_learned and own_model is not None:
            raise ValueError("a task is served either as learned on its predecessors or as its own model")
        method = get_merge(merge)
        if meta.get("base_fingerprint", self.fingerprint) != self.fingerprint:
            raise FingerprintMismatch(
                f"adapter was trained on base {meta['base_fingerprint']}, store is {self.fingerprint}"
            )
        json.dumps(meta)  # refuse unserializable meta before anything is written
        with self._writer_lock():
            check_fence(fence, name)
            ledger = self._ledger.read()
            snapshot = self._snapshot(ledger)
            live, tasks = snapshot.live, snapshot.tasks
            if trained_on is not None and tuple(t.id for t in tasks) != tuple(trained_on):
                raise LiveChanged(
                    f"the live tasks changed while {name!r} trained (it trained after "
                    f"{list(trained_on) or 'none'}, now {[t.id for t in tasks] or 'none'})"
                )
            if any(t.name == name for t in tasks):
                raise TaskExists(f"task {name!r} is live; remove it before publishing it again")
            # Numbers come from the ledger and skip local orphans: another host's cache may lack
            # a version this one has, and this one may hold an unpublished version's leftovers.
            version = max(next_number(self.root / "tasks" / name, "v"), 1 + _last_version(ledger, name))
            task_id = f"{name}/v{version}"
            fold = method.incremental and live is not None and live.method == merge and self._intact(live)
            history = self._load_tasks(tasks) if as_learned or not fold else []
            if fold:
                assert live is not None
                result = build_merge(merge, [adapter], weights, DenseDelta.load(live.path))
                based_on = live.id
            else:
                result = build_merge(merge, [*history, adapter], weights)
                based_on = None
            prefix = build_merge("concat", [*history, adapter]) if as_learned else own_model
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
                task_files = write_task(task_dir, adapter, task_meta, prefix, self.base_model)
                written.append(task_dir)
                merge_id, merge_dir, merge_files = self._write_merge(
                    result, merge, parents, weights, based_on, subspace, ledger
                )
                written.append(merge_dir)
                self._upload(task_dir, task_files)
                self._upload(merge_dir, merge_files)
                add: dict[str, Any] = {"op": "add_task", "task": name, "version": version, "id": task_id}
                if fence is not None:
                    add["fence"] = fence.token
                entries = self._ledger.append(
                    [
                        *(notes or []),
                        {**add, "files": task_files},
                        {
                            "op": "set_live",
                            "merge": merge_id,
                            "parents": parents,
                            "cause": "add_task",
                            "files": merge_files,
                        },
                    ],
                    guard=lambda connection: check_fence(fence, name, connection),
                )
            except BaseException as error:
                for path in written:
                    shutil.rmtree(path, ignore_errors=True)
                if isinstance(error, FenceLost) and error.rolled_back and fence is not None:
                    # the board's record of the lapse went with the append's transaction: asking
                    # again records it (the job fails) in a transaction of its own
                    fence.holds()
                raise_if_disk_full(error, f"publishing {task_id}")
                raise
        self._notify(entries[-1])
        return Publication(task=self._task_record(task_id), merge=self.merge(merge_id))

    def rollback(self, merge_id: str, notes: list[dict[str, Any]] | None = None) -> MergeRecord:
        """Make an earlier live merge live again (its parents become the live tasks). The merge
        and its tasks are verified first: a damaged version is refused (:class:`CorruptVersion`)."""
        with self._writer_lock():
            record = self.merge(merge_id)
            self.verify(record, *(self._task_record(task_id) for task_id in record.parents))
            live = self.live()
            if live is not None and live.id == merge_id:
                if notes:
                    self._ledger.append(notes)
                return record
            change: list[dict[str, Any]] = [
                {"op": "rollback", "merge": merge_id, "from": live.id if live else None},
                {
                    "op": "set_live",
                    "merge": merge_id,
                    "parents": list(record.parents),
                    "cause": "rollback",
                    **({"files": record.files} if record.files is not None else {}),
                },
            ]
            try:
                entries = self._ledger.append([*(notes or []), *change])
            except OSError as error:
                raise_if_disk_full(error, f"rolling back to {merge_id}")
                raise
        self._notify(entries[-1])
        return record

    def remove_task(self, name: str, notes: list[dict[str, Any]] | None = None) -> MergeRecord | None:
        """Rebuild the live merge without task ``name`` and make it live.

        Returns the new merge, or None when no task is left (the base model alone is live).
        The task's version stays on disk and in the ledger, so a rollback can bring it back.
        """
        check_task_name(name)
        with self._writer_lock():
            ledger = self._ledger.read()
            snapshot = self._snapshot(ledger)
            live, tasks = snapshot.live, snapshot.tasks
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
            set_live: dict[str, Any] = {"op": "set_live", "parents": parents, "cause": "remove_task"}
            try:
                if remaining:
                    result = build_merge(live.method, self._load_tasks(remaining), weights)
                    # The removed task's directions stay reserved: the later tasks' inputs may
                    # lie in them too (they were never added twice), so only a superset is safe.
                    kept = self._load_subspace(live) if _has_subspace(live) else None
                    kept = kept.unchanged() if kept is not None else None
                    merge_id, merge_dir, files = self._write_merge(
                        result, live.method, parents, weights, None, kept, ledger
                    )
                    self._upload(merge_dir, files)
                    set_live["files"] = files
                entries = self._ledger.append(
                    [
                        *(notes or []),
                        {"op": "remove_task", "task": name, "id": tasks[index].id},
                        {**set_live, "merge": merge_id},
                    ]
                )
            except BaseException as error:
                if merge_dir is not None:
                    shutil.rmtree(merge_dir, ignore_errors=True)
                raise_if_disk_full(error, f"removing {name}")
                raise
        self._notify(entries[-1])
        return self.merge(merge_id) if merge_id else None

    # --- readers -------------------------------------------------------------------------

    def snapshot(self) -> StoreSnapshot:
        """The live merge, the live tasks and the ledger's last ``seq``, from one ledger read."""
        return self._snapshot(self._ledger.read())

    def ledger_stamp(self) -> object:
        """Changes whenever the ledger gains an entry: what a server's poll compares."""
        return self._ledger.stamp()

    def _snapshot(self, entries: list[dict[str, Any]]) -> StoreSnapshot:
        last = next((e for e in reversed(entries) if e["op"] == "set_live"), None)
        seq = int(entries[-1]["seq"]) if entries else 0
        if last is None:
            return StoreSnapshot(None, [], seq)
        tasks = [self._task_record(task_id, entries) for task_id in last["parents"]]
        live = self._merge_record(last["merge"], entries) if last["merge"] else None
        return StoreSnapshot(live, tasks, seq)

    def tasks(self) -> list[TaskRecord]:
        """Live tasks, oldest first."""
        return self.snapshot().tasks

    def task_adapter(self, name: str) -> LoraAdapter:
        """The live version of task ``name``, masks included (verified)."""
        for task in self.tasks():
            if task.name == name:
                return self._load_tasks([task])[0]
        raise TaskNotFound(f"no live task {name!r}")

    def task_versions(self, name: str) -> list[TaskRecord]:
        """Every version of ``name`` ever published, live or not, oldest first."""
        check_task_name(name)
        entries = self._ledger.read()
        ids = [e["id"] for e in entries if e["op"] == "add_task" and e["task"] == name]
        return [self._task_record(task_id, entries) for task_id in ids]

    def history(self) -> list[LoraAdapter]:
        """The live task adapters, oldest first: what the trainer needs for the next task."""
        return self._load_tasks(self.tasks())

    def live(self) -> MergeRecord | None:
        """The live merge, or None when no task is live (serve the base model)."""
        return self.snapshot().live

    def subspace(self) -> Subspace | None:
        """The live merge's protected input subspace (inflora), or None when it has none."""
        live = self.live()
        return self._load_subspace(live) if live is not None and _has_subspace(live) else None

    def merge(self, merge_id: str) -> MergeRecord:
        """A merge version that the ledger has made live at some point."""
        return self._merge_record(merge_id, self._ledger.read())

    def merges(self) -> list[MergeRecord]:
        """Every merge that has been live, in the order it first became live."""
        entries = self._ledger.read()
        return [self._merge_record(merge_id, entries) for merge_id in merge_ids(entries)]

    def load_merge(self, merge_id: str) -> MergeResult:
        record = self.merge(merge_id)
        self.verify(record)
        if record.kind == "dense":
            return DenseDelta.load(record.path)
        return LoraAdapter.load_peft(record.path)

    def ledger(self) -> list[dict[str, Any]]:
        return self._ledger.read()

    def verify(self, *records: TaskRecord | MergeRecord | None, only: str | None = None) -> None:
        """Refuse versions that must not be read: written for another base model
        (:class:`FingerprintMismatch`), or whose files differ from the digests their ledger
        entry recorded (:class:`CorruptVersion`). Logs each refusal; None records are skipped.
        Versions from before checksums were recorded pass unverified (logged once).
        ``only`` checks that one file of each version (the one about to be read)."""
        for record in records:
            if record is None:
                continue
            try:
                recorded = record.meta.get("base_fingerprint")
                if recorded != self.fingerprint:
                    raise FingerprintMismatch(
                        f"{record.label} was written for base model {recorded}, "
                        f"this store's base is {self.fingerprint}"
                    )
                files = record.files
                if only is not None and files is not None:
                    files = {relative: digest for relative, digest in files.items() if relative == only}
                try:
                    verify_tree(record.path, files, record.label)
                except CorruptVersion as error:
                    raise CorruptVersion(f"{error}; to repair: {record.repair}") from None
            except (FingerprintMismatch, CorruptVersion) as error:
                log.error("refusing %s in %s: %s", record.label, self.root, error)
                raise

    # --- internals -----------------------------------------------------------------------

    def _intact(self, merge: MergeRecord) -> bool:
        """Whether a publish may fold into ``merge``: a damaged merge is derived data, so the
        publish rebuilds it from its tasks' verified files instead (logged), rather than failing."""
        try:
            self.verify(merge)
        except CorruptVersion:
            log.warning("the live merge %s is damaged; the new merge is built from its tasks", merge.id)
            return False
        return True

    def _writer_lock(self) -> AbstractContextManager[None]:
        return self._ledger.writer_lock()

    def _merge_record(self, merge_id: str, entries: list[dict[str, Any]]) -> MergeRecord:
        if self._objects is not None and merge_id in merge_ids(entries):
            files = recorded_files(entries, "set_live", "merge", merge_id)
            if files is not None:
                self._objects.fetch(self.root / "merges" / merge_id, files, f"merge {merge_id}")
        return merge_record(self.root, merge_id, entries)

    def _task_record(self, task_id: str, entries: list[dict[str, Any]] | None = None) -> TaskRecord:
        entries = self._ledger.read() if entries is None else entries
        if self._objects is not None:
            files = recorded_files(entries, "add_task", "id", task_id)
            if files is not None:  # only ids the ledger names reach the path below
                name, _, version = task_id.partition("/")
                self._objects.fetch(self.root / "tasks" / name / version, files, f"task {task_id}")
        return task_record(self.root, task_id, entries)

    def _upload(self, directory: Path, files: dict[str, str]) -> None:
        """Put a new version's files in object storage before the ledger names it."""
        if self._objects is not None:
            self._objects.upload(directory, files)

    def _load_tasks(self, tasks: list[TaskRecord]) -> list[LoraAdapter]:
        self.verify(*tasks)
        return [LoraAdapter.load_peft(t.path) for t in tasks]

    def _load_subspace(self, merge: MergeRecord) -> Subspace:
        """The merge's subspace, after verifying it and every merge whose basis it extends.

        Only the subspace files are checked: a merge's adapter is derived data that the next
        publish rebuilds from its tasks' own files, so a damaged one must not block later tasks."""
        entries = self._ledger.read()
        step: MergeRecord | None = merge
        while step is not None:
            self.verify(step, only=SUBSPACE_FILE)
            with safe_open(str(step.path / SUBSPACE_FILE), framework="pt") as handle:
                parent = (handle.metadata() or {}).get("parent")
            step = self._merge_record(parent, entries) if parent else None
        return Subspace.load(merge.path)

    def _write_merge(
        self,
        result: MergeResult,
        method: str,
        parents: list[str],
        weights: list[float] | None,
        based_on: str | None,
        subspace: Subspace | None,
        ledger: list[dict[str, Any]],
    ) -> tuple[str, Path, dict[str, str]]:
        """Write a merge version; ``based_on`` is the merge an incremental merge folded into."""
        meta = {
            "merge": method,
            "parents": parents,
            "weights": weights,
            "based_on": based_on,
            "base_fingerprint": self.fingerprint,
        }
        first = 1 + max((int(m[1:]) for m in merge_ids(ledger)), default=0)
        return write_merge(
            self.root / "merges", result, meta, subspace, self.base_model, self.dense_export_rank, first
        )

    def _notify(self, entry: dict[str, Any]) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event({**entry, "store": self.location})
        except Exception:
            log.exception("store event for %s failed; servers will see the ledger change instead", self.root)


def _last_version(entries: list[dict[str, Any]], name: str) -> int:
    """The highest version of ``name`` the ledger has named (0: none)."""
    return max((int(e["version"]) for e in entries if e["op"] == "add_task" and e["task"] == name), default=0)


def _has_subspace(merge: MergeRecord) -> bool:
    """Whether the merge was written with a basis: its meta says so (a missing file is then
    damage, not "no basis"); merges from before the meta recorded it have the file."""
    return "subspace" in merge.meta or Subspace.exists(merge.path)
