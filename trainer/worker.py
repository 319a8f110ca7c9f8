"""The worker's one Celery task: train a queued job's adapter and publish it to the store.

Run it with ``lamina worker`` (concurrency 1, acks_late, prefetch 1). Tasks of one store
train one at a time in arrival order: a job whose earlier jobs are not finished goes back to
the queue, and the training itself holds a per-store lock (Redis when configured, else a
file lock) so two workers never publish from the same starting state.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

from adapters_store.events import redis_notifier
from adapters_store.fingerprint import fingerprint_model
from adapters_store.store import AdapterStore
from trainer.admission import AdmissionError, admit
from trainer.celery_app import TRAIN_TASK, make_celery
from trainer.config import Example, Hyperparameters, resolve_method
from trainer.jobs import Job, JobBoard, JobError, JobStatus, Progress, now
from trainer.settings import LaminaSettings

log = logging.getLogger(__name__)
settings = LaminaSettings()
celery = make_celery(settings)

REQUEUE_DELAY_S = 0.5
CANCEL_POLL_S = 0.5
TRAIN_LOCK_TTL_S = 60  # refreshed with every progress report


@celery.task(name=TRAIN_TASK, bind=True)
def train(self: Any, job_id: str) -> None:  # noqa: ARG001 - Celery passes the task as self
    board = JobBoard(settings.store_dir)
    job = board.get(job_id)
    if job.status.terminal:
        log.info("job %s is already %s; nothing to do", job_id, job.status)
        return
    if any(other.seq < job.seq for other in board.active()):
        # Not this job's turn: put it back behind the earlier ones instead of blocking the
        # (possibly only) worker that the earlier jobs need.
        time.sleep(REQUEUE_DELAY_S)
        celery.send_task(TRAIN_TASK, args=[job_id])
        return
    run_job(settings, board, job)


@cache
def _base_model(model_dir: str) -> tuple[Any, Any]:
    """Load the base model once per worker process; train_task leaves it unchanged."""
    from trainer.loop import load_base

    return load_base(model_dir)


@cache
def _fingerprint(model_dir: str) -> str:
    return fingerprint_model(model_dir)


def open_store(settings: LaminaSettings) -> AdapterStore:
    url = settings.events_url
    return AdapterStore(
        settings.store_dir,
        _fingerprint(str(settings.model)),
        base_model=str(settings.model),
        on_event=redis_notifier(url, settings.store_dir) if url else None,
    )


def run_job(settings: LaminaSettings, board: JobBoard, job: Job) -> None:
    """Validate, train, publish; every failure ends the job as failed with the store untouched
    (publishing is the last step and is atomic)."""
    from trainer.loop import TrainingCancelled, train_task

    board.update(job.id, status=JobStatus.validating, started_at=now())
    try:
        method = resolve_method(job.method)
        hp = Hyperparameters.model_validate(job.hyperparameters)
        examples = board.examples(job.id)
        with store_turn(settings) as keep_alive:
            store = open_store(settings)
            requested_rank = hp.r
            hp = admit(store, job.name, method, hp, settings.max_lora_rank, settings.loraf_grow_rank)
            history = store.history()
            notes = _growth_notes(method.parametrization, history, hp.r)
            board.update(job.id, status=JobStatus.running)
            model, tokenizer = _base_model(str(settings.model))
            result = train_task(
                model,
                tokenizer,
                examples,
                method,
                hp,
                history,
                progress=_progress_reporter(board, job.id, keep_alive),
                should_stop=_cancel_checker(board, job.id),
            )
            if board.get(job.id).cancel_requested:
                raise TrainingCancelled()
            meta = {
                "method": method.name,
                "hyperparameters": hp.model_dump(mode="json"),
                "requested_rank": requested_rank,
                "data_hash": _data_hash(examples),
                "job_id": job.id,
                "metrics": result.metrics,
            }
            publication = store.publish(job.name, result.adapter, meta, merge=method.merge, notes=notes)
        board.update(
            job.id,
            status=JobStatus.succeeded,
            finished_at=now(),
            metrics=result.metrics,
            task_version=publication.task.id,
            merge_id=publication.merge.id,
        )
        log.info("job %s: published %s, live merge %s", job.id, publication.task.id, publication.merge.id)
    except TrainingCancelled:
        board.update(job.id, status=JobStatus.cancelled, finished_at=now())
    except AdmissionError as error:
        board.update(
            job.id,
            status=JobStatus.failed,
            finished_at=now(),
            error=JobError(message=error.message, param=error.param, code=error.code),
        )
    except Exception as error:
        log.exception("job %s failed", job.id)
        board.update(
            job.id,
            status=JobStatus.failed,
            finished_at=now(),
            error=JobError(message=f"{type(error).__name__}: {error}"),
        )


def _growth_notes(parametrization: str, history: list[Any], rank: int) -> list[dict[str, Any]]:
    """A ledger entry when this LoRAF task widens the store's shared rank."""
    if parametrization != "loraf" or not history:
        return []
    previous = max(m.rank for adapter in history for m in adapter.modules.values())
    return [{"op": "grow", "rank_from": previous, "rank_to": rank}] if rank > previous else []


def _progress_reporter(board: JobBoard, job_id: str, keep_alive: Any) -> Any:
    def report(step: int, total: int, loss: float) -> None:
        board.update(job_id, progress=Progress(step=step, total=total, loss=round(float(loss), 6)))
        keep_alive()

    return report


def _cancel_checker(board: JobBoard, job_id: str) -> Any:
    last = [0.0, False]

    def should_stop() -> bool:
        if time.monotonic() - last[0] >= CANCEL_POLL_S:
            last[0], last[1] = time.monotonic(), board.get(job_id).cancel_requested
        return bool(last[1])

    return should_stop


def _data_hash(examples: list[Example]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(example.prompt.encode() + b"\0" + example.completion.encode() + b"\n")
    return digest.hexdigest()[:16]


@contextmanager
def store_turn(settings: LaminaSettings) -> Iterator[Any]:
    """Hold the store's training lock; yields a callable that keeps the lock alive."""
    url = settings.events_url
    if url:
        import redis

        client = redis.Redis.from_url(url)
        lock = client.lock(f"lamina:train-lock:{settings.store_dir.resolve()}", timeout=TRAIN_LOCK_TTL_S)
        lock.acquire(blocking=True)
        try:
            yield lambda: lock.extend(TRAIN_LOCK_TTL_S, replace_ttl=True)
        finally:
            try:
                lock.release()
            except redis.exceptions.LockError:
                log.warning("training lock expired before release")
    else:
        settings.store_dir.mkdir(parents=True, exist_ok=True)
        with open(settings.store_dir / ".train.lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield lambda: None
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
