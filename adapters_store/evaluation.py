"""The store's accuracy matrix: what `continual` scored on every live task each time a task went
live (trainer/regression.py records each version's row in its meta as ``evaluation.row``)."""

from __future__ import annotations

from typing import Any

from adapters_store.versions import TaskRecord


def accuracy_matrix(tasks: list[TaskRecord]) -> list[dict[str, Any]]:
    """The live versions' rows, oldest first: ``{"after": task id, "row": {task: accuracy %}}``.
    Versions published without a check (before it existed, or imported) have no row."""
    rows = []
    for task in tasks:
        row = task.meta.get("evaluation", {}).get("row")
        if row:
            rows.append({"after": task.id, "row": row})
    return rows
