"""The store's accuracy matrix: what `continual` scored on every live task each time a task went
live (trainer/regression.py records each version's row in its meta as ``evaluation.row``)."""

from __future__ import annotations

from typing import Any

from adapters_store.versions import TaskRecord


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
