"""Admin endpoints (admin key required): what the store holds, its statistics as JSON and as
a picture, rollback to an earlier merge, and removing a task. Rollback and removal only
write the store's ledger; every server follows it and hot-swaps as for a publish."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, Field

from adapters_store.store import AdapterStore, MergeNotFound, MergeRecord, TaskNotFound
from server.admin.auth import require_admin
from server.errors import APIError

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


class RollbackRequest(BaseModel):
    merge_id: str = Field(description="An earlier merge version, e.g. m3 (see GET /admin/adapters).")


def _store(request: Request) -> AdapterStore:
    return request.app.state.store


def _merge_view(merge: MergeRecord, live_id: str | None) -> dict[str, Any]:
    return {
        "id": merge.id,
        "kind": merge.kind,
        "method": merge.method,
        "parents": list(merge.parents),
        "rank": merge.meta.get("rank"),
        "created_at": merge.meta.get("created_at"),
        "live": merge.id == live_id,
    }


@router.get("/adapters")
async def adapters(request: Request) -> dict[str, Any]:
    """Live tasks with their method and metrics, every merge version, and what is live."""
    store = _store(request)
    live = store.live()
    live_id = live.id if live else None
    tasks = [
        {
            "name": t.name,
            "version": t.version,
            "id": t.id,
            "method": t.meta.get("method"),
            "rank": t.meta.get("rank"),
            "created_at": t.meta.get("created_at"),
            "metrics": t.meta.get("metrics", {}),
            "hyperparameters": t.meta.get("hyperparameters", {}),
        }
        for t in store.tasks()
    ]
    merges = [_merge_view(m, live_id) for m in store.merges()]
    return {
        "live_merge": live_id,
        "tasks": tasks,
        "merges": merges,
        "growth": [e for e in store.ledger() if e.get("op") == "grow"],  # LoRAF rank growth, oldest first
        "served": request.app.state.sync.status.__dict__,
    }


@router.post("/rollback")
async def rollback(body: RollbackRequest, request: Request) -> dict[str, Any]:
    try:
        record = _store(request).rollback(body.merge_id)
    except (MergeNotFound, ValueError):
        raise APIError(
            404, f"no merge version {body.merge_id!r}", param="merge_id", code="merge_not_found"
        ) from None
    await request.app.state.sync.sync()  # this replica swaps now; others follow the ledger
    return _merge_view(record, record.id)


@router.delete("/tasks/{name}")
async def remove_task(name: str, request: Request) -> dict[str, Any]:
    try:
        record = _store(request).remove_task(name)
    except (TaskNotFound, ValueError):
        raise APIError(404, f"no live task {name!r}", param="name", code="task_not_found") from None
    await request.app.state.sync.sync()
    return {"removed": name, "live_merge": _merge_view(record, record.id) if record else None}


@router.get("/stats")
async def stats(request: Request) -> dict[str, Any]:
    """Occupancy, mask overlap, collision rates, orthogonal overlap, sparsity, sign conflicts
    and effective rank, per module and aggregated (cached per live merge)."""
    from adapters_store.stats_cache import stats_for_store

    return await run_in_threadpool(stats_for_store, _store(request))


@router.get("/stats.png", response_class=Response)
async def stats_png(request: Request) -> Response:
    from adapters_store.stats_cache import stats_for_store
    from adapters_store.stats_plot import render_stats_png

    stats = await run_in_threadpool(stats_for_store, _store(request))
    return Response(await run_in_threadpool(render_stats_png, stats), media_type="image/png")
