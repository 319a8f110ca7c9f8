"""Admin endpoints (admin key required): what the store holds, its statistics as JSON and as
a picture, rollback to an earlier merge, removing a task, and importing a LoRA trained elsewhere
as a task. These only write the store's ledger; every server follows it and hot-swaps as for a
publish. Each change is written with an ``audit`` entry in the same ledger append (the action,
its target, the time and the admin key's fingerprint), listed by ``GET /admin/adapters``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, Field

from adapters_store.errors import CorruptVersion, DiskFull, FingerprintMismatch, LiveChanged, StoreError
from adapters_store.evaluation import accuracy_matrix, stats_with_accuracy
from adapters_store.lora import LoraAdapter
from adapters_store.merges import MergeError
from adapters_store.store import (
    AdapterStore,
    InvalidTaskName,
    MergeNotFound,
    MergeRecord,
    TaskExists,
    TaskNotFound,
    TaskRecord,
    check_task_name,
)
from server.admin.auth import key_fingerprint, require_admin
from server.admin.imports import base_linear_shapes, parse_peft_lora, refuse
from server.errors import APIError
from server.swap.registry import CONTINUAL
from trainer.contract.admission import IMPORTED, AdmissionError, check_concat_rank

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


class RollbackRequest(BaseModel):
    merge_id: str = Field(description="An earlier merge version, e.g. m3 (see GET /admin/adapters).")


def _store(request: Request) -> AdapterStore:
    return request.app.state.store


def _audit(request: Request, action: str, target: str) -> list[dict[str, Any]]:
    """The ledger note that records an admin action (the ledger adds seq and time)."""
    return [{"op": "audit", "action": action, "target": target, "key": key_fingerprint(request)}]


def _store_refusal(error: StoreError, param: str) -> APIError:
    """A store refusal as HTTP: a damaged version or another base's is 409, a full disk 507."""
    if isinstance(error, DiskFull):
        return APIError(507, str(error), param=None, code="disk_full")
    if isinstance(error, CorruptVersion | FingerprintMismatch):
        return APIError(409, str(error), param=param, code="corrupt_version")
    raise error


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
    try:
        return _adapters_view(request, store)
    except (CorruptVersion, FingerprintMismatch) as error:  # a meta.json the store cannot read
        raise _store_refusal(error, "store") from None


def _adapters_view(request: Request, store: AdapterStore) -> dict[str, Any]:
    live = store.live()
    live_id = live.id if live else None
    records = store.tasks()
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
            # what `continual` scored on every live task when this version was published (in %)
            "evaluation_row": t.meta.get("evaluation", {}).get("row"),
        }
        for t in records
    ]
    merges = [_merge_view(m, live_id) for m in store.merges()]
    ledger = store.ledger()
    return {
        "live_merge": live_id,
        "tasks": tasks,
        # the live versions' rows, oldest first: row i is continual right after task i went live
        "accuracy_matrix": accuracy_matrix(records),
        "merges": merges,
        "growth": [e for e in ledger if e.get("op") == "grow"],  # LoRAF rank growth, oldest first
        "audit": [e for e in ledger if e.get("op") == "audit"],  # admin actions, oldest first
        "served": request.app.state.sync.status.__dict__,
    }


@router.post("/adapters", status_code=201)
async def import_adapter(
    request: Request,
    name: str = Form(description="The task's name, as for POST /tasks: it becomes a model name."),
    config: UploadFile = File(description="The adapter's adapter_config.json (PEFT)."),
    weights: UploadFile = File(description="The adapter's adapter_model.safetensors (PEFT)."),
) -> dict[str, Any]:
    """Import a PEFT LoRA trained elsewhere as task ``name``: multipart with the two files
    ``save_pretrained`` writes. It is checked against the base model (its modules exist and are
    linear layers, lora_A/lora_B fit their in/out features, r <= max_lora_rank) and refused with
    422 naming what is wrong; then published like a trained task (a new version, the continual
    merge rebuilt with it) and hot-swapped in. 409 when a live task has that name or it cannot
    join the live merge."""
    settings = request.app.state.settings
    try:
        check_task_name(name)
    except InvalidTaskName as error:
        raise refuse(str(error), "name", code="invalid_name") from None
    if name in (settings.base_model_name, CONTINUAL):
        raise refuse(f"{name!r} is reserved for a served model", "name", code="invalid_name")
    config_bytes, weights_bytes = await config.read(), await weights.read()
    shapes = await run_in_threadpool(base_linear_shapes, settings.model)
    adapter, peft_config = await run_in_threadpool(
        parse_peft_lora, config_bytes, weights_bytes, shapes, settings.max_lora_rank
    )
    store = _store(request)
    try:  # reading the live tasks and basis can meet a damaged version too: a 409 naming it
        attempt = functools.partial(
            _publish_import,
            store,
            name,
            adapter,
            peft_config,
            settings.max_lora_rank,
            _audit(request, "import", name),
        )
        record = await run_in_threadpool(_until_settled, attempt)
    except StoreError as error:
        raise _store_refusal(error, "name") from None
    await _serve_here(request, f"imported task {record.id}")
    live = store.live()
    return {
        "name": name,
        "id": record.id,
        "rank": adapter.rank,
        "target_modules": adapter.target_modules,
        "live_merge": _merge_view(live, live.id) if live else None,
    }


IMPORT_ATTEMPTS = 3  # a training job's publish can move the live model between the read and the write


def _until_settled(attempt: Callable[[], TaskRecord]) -> TaskRecord:
    """Run an import until it publishes on the live model it was checked against: the store
    refuses it with LiveChanged when a job published or an admin changed the live tasks between
    its read and its write, and it is read and checked again on the new live model, as a
    trained task is; after IMPORT_ATTEMPTS changes in a row it is a 409."""
    changes: list[LiveChanged] = []
    while len(changes) < IMPORT_ATTEMPTS:
        try:
            return attempt()
        except LiveChanged as error:
            changes.append(error)
    raise refuse(
        f"the live tasks kept changing while the adapter was imported ({changes[-1]}); try again",
        "name",
        code="store_changed",
        status=409,
    )


def _publish_import(
    store: AdapterStore,
    name: str,
    adapter: LoraAdapter,
    peft_config: dict[str, Any],
    max_lora_rank: int,
    audit: list[dict[str, Any]],
) -> TaskRecord:
    """Publish through the store's one atomic path, under the rules a trained task meets: checked
    against one snapshot of the live model and published only onto it (``trained_on``), with the
    live merge's method; what cannot join it (other target modules, a concat rank beyond the
    engine's) is a 409."""
    snapshot = store.snapshot()
    live, tasks = snapshot.live, snapshot.tasks
    merge = live.method if live is not None else "concat"
    if tasks:
        theirs = sorted(store.task_adapter(tasks[0].name).modules)
        if sorted(adapter.modules) != theirs:
            raise refuse(
                f"the live tasks adapt {len(theirs)} modules ({', '.join(sorted({m.rsplit('.', 1)[-1] for m in theirs}))}); "
                f"this adapter adapts {len(adapter.modules)} ({', '.join(adapter.target_modules)}): "
                "a store merges adapters of the same modules",
                "weights",
                code="modules_differ",
                status=409,
            )
    if merge == "concat":
        try:
            check_concat_rank(
                (int(t.meta.get("rank", 0)) for t in tasks),
                adapter.rank,
                max_lora_rank,
                "weights",
                "Remove a task, or raise LAMINA_MAX_LORA_RANK.",
            )
        except AdmissionError as error:
            raise refuse(error.message, error.param, code=error.code, status=409) from None
    live_subspace = store.subspace()  # inflora: keep protecting the earlier tasks' inputs
    meta = {
        "method": IMPORTED,
        "imported": {
            "base_model_name_or_path": peft_config.get("base_model_name_or_path"),
            "r": peft_config.get("r"),
            "lora_alpha": peft_config.get("lora_alpha"),
            "use_rslora": bool(peft_config.get("use_rslora")),
        },
    }
    try:
        publication = store.publish(
            name,
            adapter,
            meta,
            merge,
            subspace=live_subspace.unchanged() if live_subspace is not None else None,
            notes=audit,
            trained_on=tuple(t.id for t in tasks),
        )
    except TaskExists as error:
        raise refuse(str(error), "name", code="task_exists", status=409) from None
    except MergeError as error:
        raise refuse(
            f"cannot join the live {merge} merge: {error}", "weights", code="merge_failed", status=409
        ) from None
    except LiveChanged:
        raise  # _until_settled reads the new live model and checks again
    except StoreError as error:
        raise _store_refusal(error, "name") from None
    return publication.task


async def _serve_here(request: Request, done: str) -> None:
    """Swap this replica now (others follow the ledger). The store already holds the change, so
    a failed swap is no reason to repeat the action: a 503 says both, and the server retries the
    swap on its own (``/ready`` shows when). While the engine is still loading there is nothing
    to swap: its first sync serves the store as it is then."""
    if not request.app.state.engine.ready:
        return
    sync = request.app.state.sync
    if not await sync.sync():
        status = sync.status
        raise APIError(
            503,
            f"{done} in the store, but this server could not serve it yet ({status.last_error}); "
            f"it keeps serving {status.live_merge or 'the base'} and retries in {status.retry_in_s:.0f} s",
            code="not_served_yet",
            type="server_error",
        )


@router.post("/rollback")
async def rollback(body: RollbackRequest, request: Request) -> dict[str, Any]:
    try:
        record = await run_in_threadpool(
            _store(request).rollback, body.merge_id, _audit(request, "rollback", body.merge_id)
        )
    except MergeNotFound:
        raise APIError(
            404, f"no merge version {body.merge_id!r}", param="merge_id", code="merge_not_found"
        ) from None
    except StoreError as error:
        raise _store_refusal(error, "merge_id") from None
    await _serve_here(request, f"rolled back to {record.id}")
    return _merge_view(record, record.id)


@router.delete("/tasks/{name}")
async def remove_task(name: str, request: Request) -> dict[str, Any]:
    try:
        record = await run_in_threadpool(
            _store(request).remove_task, name, _audit(request, "remove_task", name)
        )
    except (TaskNotFound, InvalidTaskName):
        raise APIError(404, f"no live task {name!r}", param="name", code="task_not_found") from None
    except MergeError as error:  # the remaining tasks could not be merged again: not a missing task
        raise APIError(
            409, f"cannot merge the remaining tasks: {error}", param="name", code="merge_failed"
        ) from None
    except StoreError as error:
        raise _store_refusal(error, "name") from None
    await _serve_here(request, f"removed task {name!r}")
    return {"removed": name, "live_merge": _merge_view(record, record.id) if record else None}


@router.get("/stats")
async def stats(request: Request) -> dict[str, Any]:
    """Occupancy, mask overlap, collision rates, orthogonal overlap, sparsity, sign conflicts
    and effective rank, per module and aggregated (cached per live merge)."""
    return await run_in_threadpool(stats_with_accuracy, _store(request))


@router.get("/stats.png", response_class=Response)
async def stats_png(request: Request) -> Response:
    from adapters_store.stats_plot import render_stats_png

    stats = await run_in_threadpool(stats_with_accuracy, _store(request))
    return Response(await run_in_threadpool(render_stats_png, stats), media_type="image/png")
