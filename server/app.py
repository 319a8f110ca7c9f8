"""The FastAPI application factory.

The vLLM engine is built in a background thread during the app's lifespan, so that
``/health`` answers at once and ``/ready`` turns 200 when the engine can serve; the engine is
shut down on every exit path (Ctrl-C included) so its child processes never outlive us.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from adapters_store.events import redis_notifier
from adapters_store.fingerprint import fingerprint_model
from adapters_store.store import AdapterStore
from server.admin.auth import require_admin, require_user
from server.admin.router import router as admin_router
from server.admin.ui import router as admin_ui_router
from server.engine import Engine
from server.errors import install_error_handlers
from server.finetuning.backends import finetuning_backends
from server.finetuning.router import router as finetuning_router
from server.finetuning.service import FineTuningService
from server.limits import BodySizeLimit
from server.metrics import LaminaMetrics
from server.openai.router import router as openai_router
from server.openai.router import tokenizer_router
from server.openai.routing import ContinualRouter
from server.openai.serving import CompletionService
from server.request_id import RequestIdMiddleware, install_log_records
from server.settings import ServerSettings
from server.swap.registry import CONTINUAL, ModelRegistry
from server.swap.sync import AdapterSync
from server.training.router import document_task_schema
from server.training.router import router as training_router
from server.training.service import TrainingService
from trainer.contract.backends import store_backends

log = logging.getLogger(__name__)


def _start_in_own_group(engine: Engine) -> None:
    """Start the engine with its processes outside the server's process group, so that a
    Ctrl-C to the group stops only the server, which drains its streams before it shuts the
    engine down (server/engine_process.py)."""
    from server.engine_process import engine_core_in_own_group

    with engine_core_in_own_group():
        engine.start()


def create_app(settings: ServerSettings | None = None, *, start_engine: bool = True) -> FastAPI:
    """Build the app. ``start_engine=False`` gives an app whose engine never loads (for tests
    of the code around the engine: validation, error shapes, routing)."""
    settings = settings or ServerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine: Engine = app.state.engine
        sync: AdapterSync = app.state.sync

        async def boot() -> None:
            await asyncio.to_thread(_start_in_own_group, engine)
            app.state.following = asyncio.create_task(sync.follow())

        loading = asyncio.create_task(boot()) if start_engine else None
        app.state.engine_loading = loading
        try:
            yield
        finally:
            if loading is not None and not loading.done():
                log.info("waiting for the engine to finish loading before shutting it down")
                await asyncio.gather(loading, return_exceptions=True)
            following = getattr(app.state, "following", None)
            if following is not None:
                following.cancel()
                await asyncio.gather(following, return_exceptions=True)
            log.info("requests drained; shutting the engine down")
            if start_engine:
                from server.engine_process import stop_engine_groups

                stop_engine_groups()
            engine.shutdown()

    app = FastAPI(title="Lamina", version="0.1.0", lifespan=lifespan)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(settings.model))
    engine = Engine(settings)
    registry = ModelRegistry(settings.base_model_name)
    store = AdapterStore(
        settings.store_dir,
        fingerprint_model(settings.model),
        base_model=settings.model_name,
        dense_export_rank=settings.max_lora_rank,
        # an admin rollback, removal or import on this replica wakes the others at once
        on_event=redis_notifier(settings.events_url, settings.store_location)
        if settings.events_url
        else None,
        **store_backends(settings),
    )
    training = TrainingService(
        settings,
        store,
        settings.fallback_method,
        settings.max_examples,
        reserved_names=(settings.base_model_name, CONTINUAL),
    )
    metrics = LaminaMetrics(training.board)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.engine = engine
    app.state.registry = registry
    app.state.store = store
    router = ContinualRouter(settings.continual_routing, settings.base_model_name, settings.model, tokenizer)
    app.state.sync = AdapterSync(
        engine,
        registry,
        store,
        cache_dir=settings.cache_dir,
        max_lora_rank=settings.max_lora_rank,
        events_url=settings.events_url,
        poll_interval_s=settings.ledger_poll_s,
        dense_serving=settings.serving_mode,
        drain_s=settings.weights_swap_drain_s,
        base_model_dir=settings.model,
        metrics=metrics,
        router=router,
    )
    app.state.completions = CompletionService(settings, engine, registry, tokenizer, metrics, router)
    training.served_here = lambda: app.state.sync.status.tasks  # a job succeeds here once served here
    app.state.training = training
    app.state.finetuning = FineTuningService(
        training,
        settings.store_dir,
        base_names={settings.base_model_name},
        base_name=settings.base_model_name,
        default_method=settings.fallback_method,
        max_file_bytes=settings.max_file_bytes,
        **finetuning_backends(settings),
    )
    install_error_handlers(app)
    install_log_records()
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestIdMiddleware)  # added last: outermost, so every response carries it
    app.include_router(openai_router, dependencies=[Depends(require_user)])
    app.include_router(tokenizer_router, dependencies=[Depends(require_user)])
    app.include_router(training_router, dependencies=[Depends(require_user)])
    app.include_router(finetuning_router, dependencies=[Depends(require_user)])
    document_task_schema(app)
    app.include_router(admin_ui_router)  # the admin page: public shell, data from /admin with the key
    app.include_router(admin_router)

    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, str]:
        """The process is up (the engine may still be loading)."""
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"])
    async def ready(request: Request) -> JSONResponse:
        """200 once the engine serves what the store says is live; 503 before, if the engine
        failed to load, and while the last sync failed (``out_of_sync``, with the error and when
        the server retries: it keeps serving the models it had). ``events`` is ``redis`` while
        store events arrive, ``polling`` while the server follows the ledger alone (no Redis
        configured, or Redis unreachable): it serves either way."""
        loading = getattr(request.app.state, "engine_loading", None)
        if loading is not None and loading.done() and loading.exception() is not None:
            detail = f"engine failed to start: {loading.exception()}"
            return JSONResponse(status_code=503, content={"status": "failed", "detail": detail})
        sync: AdapterSync = request.app.state.sync
        status = sync.status
        if not request.app.state.engine.ready or status.syncs == 0:
            return JSONResponse(status_code=503, content={"status": "loading"})
        # how store changes reach this server: Redis events, or (Redis unset or away) the ledger poll
        events = sync.events.mode if sync.events is not None else "polling"
        served = {"live_merge": status.live_merge, "tasks": status.tasks, "events": events}
        if not status.in_step:  # live_merge/tasks: what it still serves, not what the store says
            behind = {"detail": status.last_error, "retry_in_s": status.retry_in_s}
            return JSONResponse(status_code=503, content={"status": "out_of_sync", **served, **behind})
        return JSONResponse({"status": "ready", **served})

    @app.get(
        "/metrics",
        tags=["ops"],
        dependencies=[Depends(require_admin)],
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
    )
    async def metrics_text(request: Request) -> Response:
        """Prometheus text format: vLLM's engine metrics and Lamina's (server/metrics.py).
        Needs the admin key, as /admin does."""
        lamina: LaminaMetrics = request.app.state.metrics
        lamina.refresh_mask_occupancy(request.app.state.store)
        return Response(await run_in_threadpool(lamina.exposition), media_type=CONTENT_TYPE_LATEST)

    return app
