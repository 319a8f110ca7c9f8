"""What the store holds, as records, and how one version directory is written.

A version is written under a hidden temporary sibling, fsynced and renamed into place, so a
reader sees a whole version or none; the digests of its files come back from the write so the
ledger entry that names the version can record them (:mod:`adapters_store.integrity`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from adapters_store.errors import CorruptVersion, MergeNotFound, TaskNotFound
from adapters_store.integrity import content_id, digest_tree
from adapters_store.ledger import fsync_path
from adapters_store.ledger import now as _now
from adapters_store.lora import LoraAdapter
from adapters_store.merges import DenseDelta, MergeResult
from adapters_store.subspace import Subspace

META_FILE = "meta.json"
_TASK_ID = re.compile(r"(?P<name>[a-z0-9][a-z0-9_-]{0,63})/v(?P<version>[1-9][0-9]*)", re.ASCII)
_MERGE_ID = re.compile(r"m[1-9][0-9]*", re.ASCII)
AS_LEARNED_DIR = "as_learned"  # inside a task version: the LoRA model=<task> serves, when not the adapter


@dataclass(frozen=True)
class TaskRecord:
    """One immutable task version."""

    name: str
    version: int
    path: Path  # directory in PEFT layout: load it with LoraAdapter.load_peft or vLLM
    meta: dict[str, Any]
    # relative path -> sha256, as its ledger entry recorded; None for versions published before
    files: dict[str, str] | None = field(default=None, compare=False)

    @property
    def id(self) -> str:
        return f"{self.name}/v{self.version}"

    @property
    def label(self) -> str:
        return f"task {self.id}"

    @property
    def repair(self) -> str:
        """What an operator does when this version's files are damaged: a task's adapter is the
        only copy of what it learned, so it leaves the live model and is trained again."""
        return (
            f"remove it (DELETE /admin/tasks/{self.name}, or POST /admin/rollback to a merge "
            f"without it) and post the task again"
        )

    @property
    def content_id(self) -> str:
        """What this version holds, as a short digest: the key of anything cached from it."""
        return content_id(self.path, self.files)

    @property
    def serving_path(self) -> Path:
        """What ``model=<task>`` serves: the task's own adapter, or, for methods that train each
        task on top of its predecessors, the model as it was when this task was learned, or, for
        ``own-lora``, the task's whole adapter (the merge holds only part of it)."""
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
    files: dict[str, str] | None = field(default=None, compare=False)  # as for TaskRecord

    @property
    def label(self) -> str:
        return f"merge {self.id}"

    @property
    def repair(self) -> str:
        """A merge is derived data: the next publish rebuilds it from its tasks' own files."""
        return (
            "nothing is lost: the next task's publish rebuilds the merge from its tasks' files; "
            "POST /admin/rollback to another merge serves one now"
        )

    @property
    def content_id(self) -> str:
        """What this merge holds, as a short digest: the key of anything cached from it."""
        return content_id(self.path, self.files)


@dataclass(frozen=True)
class Publication:
    """What :meth:`AdapterStore.publish` made: the task version and the new live merge."""

    task: TaskRecord
    merge: MergeRecord


@dataclass(frozen=True)
class StoreSnapshot:
    """The live merge and the live tasks as of one ledger read, and that read's last ``seq``:
    a caller that needs both never pairs one version's tasks with another's merge."""

    live: MergeRecord | None
    tasks: list[TaskRecord]
    seq: int


def next_number(parent: Path, prefix: str) -> int:
    """1 + the largest ``<prefix><k>`` in ``parent``, orphans included (never reuse a name)."""
    taken = [int(p.name[len(prefix) :]) for p in parent.glob(f"{prefix}*") if p.name[len(prefix) :].isdigit()]
    return max(taken, default=0) + 1


def write_version(final: Path, write: Callable[[Path], None]) -> dict[str, str]:
    """Write into a hidden sibling, fsync it, then rename it to ``final`` in one step; returns
    the sha256 of every file written (relative path -> hex), taken before the rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{uuid.uuid4().hex}")
    tmp.mkdir()
    try:
        write(tmp)
        for file in tmp.rglob("*"):
            fsync_path(file)
        fsync_path(tmp)
        digests = digest_tree(tmp)
        os.rename(tmp, final)  # fails if ``final`` exists with content: versions are never replaced
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(final.parent)
    return digests


def write_task(
    directory: Path,
    adapter: LoraAdapter,
    meta: dict[str, Any],
    as_learned: MergeResult | None,
    base_model: str,
) -> dict[str, str]:
    """Write a task version to ``directory``: its adapter (masks included), the model as
    learned when there is one, and its meta. Returns its files' digests."""

    def write(tmp: Path) -> None:
        adapter.save_peft(tmp, base_model=base_model)
        task_meta = meta
        if isinstance(as_learned, LoraAdapter):
            (tmp / AS_LEARNED_DIR).mkdir()
            as_learned.save_peft(tmp / AS_LEARNED_DIR, base_model=base_model)
            task_meta = {**meta, "as_learned_rank": as_learned.rank}
        (tmp / META_FILE).write_text(json.dumps(task_meta, indent=2))

    return write_version(directory, write)


def write_merge(
    merges_dir: Path,
    result: MergeResult,
    meta: dict[str, Any],
    subspace: Subspace | None,
    base_model: str,
    dense_export_rank: int,
    first: int = 1,
) -> tuple[str, Path, dict[str, str]]:
    """Write the next merge version under ``merges_dir``; ``meta`` holds what the caller knows
    (method, parents, weights, fingerprint), this adds the id, kind, rank and, for a dense merge,
    its rank-``dense_export_rank`` SVD in PEFT layout and that SVD's error. Its number is the
    first free one from ``first`` (the ledger's next) on, skipping local orphans. Returns the
    merge's id, its directory and its files' digests."""
    merge_id = f"m{max(next_number(merges_dir, 'm'), first)}"
    meta = {
        "id": merge_id,
        "kind": "dense" if isinstance(result, DenseDelta) else "lora",
        **meta,
        "rank": None if isinstance(result, DenseDelta) else result.rank,
        "created_at": _now(),
    }
    if subspace is not None:
        meta["subspace"] = subspace.summary()
    export: LoraAdapter | None = None
    if isinstance(result, DenseDelta):
        export, error = result.to_lora_svd(dense_export_rank)
        meta["svd_rank"], meta["svd_relative_error"] = dense_export_rank, error

    def write(directory: Path) -> None:
        if isinstance(result, DenseDelta):
            result.save(directory)
            assert export is not None
            export.save_peft(directory, base_model=base_model)
        else:
            result.save_peft(directory, base_model=base_model)
        if subspace is not None:
            subspace.save(directory)
        (directory / META_FILE).write_text(json.dumps(meta, indent=2))

    path = merges_dir / merge_id
    return merge_id, path, write_version(path, write)


def merge_ids(entries: list[dict[str, Any]]) -> list[str]:
    """Merges in the order they first became live."""
    return list(dict.fromkeys(e["merge"] for e in entries if e["op"] == "set_live" and e["merge"]))


def recorded_files(entries: list[dict[str, Any]], op: str, key: str, value: str) -> dict[str, str] | None:
    """The digests the first ledger entry of ``op`` whose ``key`` is ``value`` recorded."""
    return next((e["files"] for e in entries if e["op"] == op and e.get(key) == value and "files" in e), None)


def merge_record(root: Path, merge_id: str, entries: list[dict[str, Any]]) -> MergeRecord:
    """The merge ``merge_id`` as the ledger ``entries`` know it (its digests from the first
    ``set_live`` that names it); :class:`MergeNotFound` unless it has been live."""
    if not isinstance(merge_id, str) or not _MERGE_ID.fullmatch(merge_id):
        raise MergeNotFound(f"not a merge id: {merge_id!r}")
    path = root / "merges" / merge_id
    if not (path / META_FILE).is_file() or merge_id not in merge_ids(entries):
        raise MergeNotFound(f"no merge {merge_id} in the ledger")
    try:
        meta = json.loads((path / META_FILE).read_text())
    except ValueError as error:
        raise CorruptVersion(f"merge {merge_id}: {META_FILE} is not JSON ({error})") from None
    files = next(
        (e["files"] for e in entries if e["op"] == "set_live" and e["merge"] == merge_id and "files" in e),
        None,
    )
    return MergeRecord(merge_id, meta["kind"], meta["merge"], path, tuple(meta["parents"]), meta, files)


def task_record(root: Path, task_id: str, entries: list[dict[str, Any]]) -> TaskRecord:
    """The task version ``task_id``, its digests from its ``add_task`` entry; a meta.json that
    is missing or not JSON is :class:`CorruptVersion`."""
    match = _TASK_ID.fullmatch(task_id)
    if match is None:
        raise TaskNotFound(f"not a task version id: {task_id!r}")
    name, version = match["name"], int(match["version"])
    path = root / "tasks" / name / f"v{version}"
    files = next(
        (e.get("files") for e in reversed(entries) if e["op"] == "add_task" and e["id"] == task_id), None
    )
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        raise CorruptVersion(f"task {task_id}: {META_FILE} is missing from {path}") from None
    except ValueError as error:
        raise CorruptVersion(f"task {task_id}: {META_FILE} is not JSON ({error})") from None
    return TaskRecord(name, version, path, meta, files)
