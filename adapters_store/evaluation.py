"""The store's accuracy matrix: what `continual` scored on every live task each time a task went
live (trainer/regression.py records each version's row in its meta as ``evaluation.row``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from adapters_store.versions import TaskRecord

if TYPE_CHECKING:
    from adapters_store.store import AdapterStore

GENERAL_COLUMN = "base (general)"  # the matrix's first column: the base's own answers kept


def accuracy_matrix(tasks: list[TaskRecord]) -> list[dict[str, Any]]:
    """The live versions' rows, oldest first: ``{"after": task id, "row": {task: accuracy %},
    "delta": {task: points since its previous score}}``, with ``"general": {"agreement": %, "n":
    prompts, "delta": points}`` where the base's general answers were scored (the base, before
    any task, agrees with itself: 100). Versions published without a check (before it existed,
    or imported) have no row."""
    rows = []
    latest: dict[str, float] = {}
    agreement = 100.0
    for task in tasks:
        evaluation = task.meta.get("evaluation", {})
        if not evaluation.get("row"):
            continue
        row = evaluation["row"]
        entry = {
            "after": task.id,
            "row": row,
            "delta": {n: round(v - latest[n], 2) for n, v in row.items() if n in latest},
        }
        if "general" in evaluation:
            general = evaluation["general"]
            entry["general"] = {**general, "delta": round(general["agreement"] - agreement, 2)}
            agreement = general["agreement"]
        latest.update(row)
        rows.append(entry)
    return rows


def latest_row(metas: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Each task's score at the last publish that scored it (the live versions' metas, oldest
    first: the newest row wins)."""
    row: dict[str, float] = {}
    for meta in metas:
        row.update(meta.get("evaluation", {}).get("row", {}))
    return row


def latest_general(metas: Sequence[Mapping[str, Any]]) -> float | None:
    """The base's general agreement at the last publish that measured it; 100 with no live task
    (the base agrees with itself); None when the live tasks predate the measurement."""
    if not metas:
        return 100.0
    found = [m["evaluation"]["general"]["agreement"] for m in metas if "general" in m.get("evaluation", {})]
    return found[-1] if found else None


def matrix_table(matrix: list[dict[str, Any]]) -> tuple[list[str], list[list[float | None]]]:
    """The matrix as columns and cells, one row per version: the base's column first where it
    was scored, then every task in the order it first appears; None where a version has no
    score (the task did not exist yet). What ``lamina stats`` prints and the PNG draws."""
    names = list(dict.fromkeys(name for entry in matrix for name in entry["row"]))
    general = any("general" in entry for entry in matrix)
    cells = [
        ([entry.get("general", {}).get("agreement")] if general else [])
        + [entry["row"].get(name) for name in names]
        for entry in matrix
    ]
    return ([GENERAL_COLUMN] if general else []) + names, cells


def stats_with_accuracy(store: AdapterStore) -> dict[str, Any]:
    """The admin statistics (:func:`adapters_store.stats_cache.stats_for_store`) with the
    store's accuracy matrix: what ``/admin/stats``, its PNG and ``lamina stats`` show."""
    from adapters_store.stats_cache import stats_for_store

    return {**stats_for_store(store), "accuracy_matrix": accuracy_matrix(store.tasks())}
