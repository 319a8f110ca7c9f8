"""The worker's one Celery task: train the store's queued jobs and publish them to the store.

Run it with ``lamina worker`` (concurrency 1, acks_late, prefetch 1). The job board, not the
broker, is the truth about what is left to train: a message only says "there is work", and the
worker that gets it claims the earliest queued job (:meth:`JobBoard.claim_next`), trains it,
and goes on until none is queued. So tasks of a store train one at a time in arrival order, a
lost or duplicated message neither loses nor repeats a job, and a job whose worker died is
failed once its lease lapses, after which the next task trains. A worker renews its claim from
a heartbeat thread while it trains and also holds the store's lock (Redis when configured,
else a file lock) so two workers never publish from the same starting state.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import TYPE_CHECKING, Any

import redis
from celery.signals import worker_ready

from adapters_store.atomic import locked_file
from adapters_store.database import UNAVAILABLE
from adapters_store.errors import DiskFull, FenceLost, LiveChanged
from adapters_store.events import redis_notifier
from adapters_store.fingerprint import fingerprint_model
from adapters_store.store import AdapterStore
from trainer.celery_app import TRAIN_TASK, make_celery
from trainer.config import Hyperparameters, resolve_method
from trainer.contract.admission import AdmissionError
from trainer.contract.backends import open_board, store_backends
from trainer.contract.board import (
    DISK_FULL,
    STORE_CHANGED,
    WOULD_FORGET,
    Job,
    JobBoard,
    JobError,
    JobStatus,
    Progress,
)
from trainer.contract.jobs import LOSS_CURVE_POINTS
from trainer.contract.logs import log_context
from trainer.contract.settings import LaminaSettings

if TYPE_CHECKING:
    from adapters_store.interface import Fence
    from trainer.publish import Gate, Hooks

log = logging.getLogger(__name__)
settings = LaminaSettings()
celery = make_celery(settings)

CANCEL_POLL_S = 0.5
CLAIM_RETRY_S = 1.0


class ClaimLost(Exception):
    """This worker's claim on its job lapsed (it stalled past the lease): stop, publish nothing."""


@celery.task(name=TRAIN_TASK)
def train(job_id: str | None = None) -> None:
    """Train queued jobs, earliest first, until none is left. ``job_id`` is the job whose
    submission sent this message; it is only logged, since any queued job may be next."""
    log.info("woken by %s", job_id or "worker start")
    import trainer.loop  # noqa: F401 - seconds of torch imports, paid before a claim's lease starts

    board = open_board(settings)
    while True:
        try:
            with store_turn(settings) as keep_lock:
                job = board.claim_next(worker_name(), settings.job_lease_s)
                if job is not None:
                    log.info("claimed %s (%s, seq %d)", job.id, job.name, job.seq)
                    run_job(settings, board, job, keep_lock)
                    continue
        except redis.exceptions.ConnectionError:
            log.warning("Redis is unreachable for the store lock; retrying")
        except UNAVAILABLE as error:  # the job board's database restarting: claim once it is back
            log.warning("the job board is unreachable (%s); retrying", error)
        else:
            if not any(j.status == JobStatus.queued for j in board.all()):
                return
        # Redis is away, or another worker's claim still holds although we had the lock (its
        # Redis lock vanished in a Redis restart): wait until it finishes or its lease lapses.
        time.sleep(CLAIM_RETRY_S)


@worker_ready.connect
def _look_at_the_board_on_start(**_: Any) -> None:
    """A (re)started worker looks at the job board at once, so jobs whose messages were lost
    (a broker restarted without persistence) or whose worker died are handled without waiting
    for the next submission."""
    celery.send_task(TRAIN_TASK, args=[None])


def worker_name() -> str:
    """Who holds a claim: host and process (the prefork child that trains)."""
    return f"{socket.gethostname()}:{os.getpid()}"


@cache
def _base_model(model_dir: str, device: str = "auto") -> tuple[Any, Any]:
    """Load the base model once per worker process, onto the device LAMINA_DEVICE selects;
    train_task leaves it unchanged."""
    from trainer.loop import load_base, select_device

    chosen = select_device(device)
    log.info("training on %s", chosen)
    return load_base(model_dir, chosen)


@cache
def _fingerprint(model_dir: str) -> str:
    return fingerprint_model(model_dir)


def open_store(settings: LaminaSettings) -> AdapterStore:
    url = settings.events_url
    return AdapterStore(
        settings.store_dir,
        _fingerprint(str(settings.model)),
        base_model=settings.model_name,
        dense_export_rank=settings.max_lora_rank,
        on_event=redis_notifier(url, settings.store_location) if url else None,
        **store_backends(settings),
    )


def gate_for(settings: LaminaSettings) -> Gate | None:
    """The check before every publish, as the settings ask for it (None: ``off``)."""
    from trainer.publish import Gate

    policy = settings.forgetting_policy
    if policy == "off":
        return None
    return Gate(settings.continual_routing, settings.max_forgetting, policy, settings.max_general_drop)


PUBLISH_ATTEMPTS = 2  # a job whose live tasks an admin changed while it trained trains once more


def run_job(settings: LaminaSettings, board: JobBoard, job: Job, keep_lock: Callable[[], Any]) -> None:
    """Validate, train, publish a job this worker has claimed; every failure ends the job as
    failed with the store untouched (publishing is the last step and is atomic)."""
    from trainer.loop import TrainingCancelled
    from trainer.publish import train_and_publish
    from trainer.regression import WouldForget

    me = job.worker or worker_name()
    with (
        log_context(job_id=job.id, model=job.name),
        heartbeat(board, job.id, me, settings.job_lease_s, keep_lock) as claim_held,
    ):
        try:
            for attempt in range(1, PUBLISH_ATTEMPTS + 1):
                try:
                    trained, publication = train_and_publish(
                        open_store(settings),
                        job.name,
                        board.examples(job.id),
                        resolve_method(job.method),
                        Hyperparameters.model_validate(job.hyperparameters),
                        lambda: _base_model(str(settings.model), settings.device),
                        max_lora_rank=settings.max_lora_rank,
                        loraf_grow_rank=settings.loraf_grow_rank,
                        hooks=_job_hooks(settings, board, job, me, claim_held),
                        extra_meta={"job_id": job.id},
                        cache_dir=settings.cache_dir,
                        gate=gate_for(settings),
                        validation=board.validation_examples(job.id),
                    )
                    break
                except LiveChanged as error:  # an admin action moved the live model: train again on it
                    if attempt == PUBLISH_ATTEMPTS:
                        raise
                    log.warning("job %s: %s; training again on the live tasks", job.id, error)
            board.update_claimed(
                job.id,
                me,
                status=JobStatus.succeeded,
                metrics=trained.result.metrics,
                warnings=trained.result.warnings,
                hyperparameters=trained.hyperparameters.model_dump(mode="json", exclude_unset=True),
                task_version=publication.task.id,
                merge_id=publication.merge.id,
            )
            log.info(
                "job %s: published %s, live merge %s",
                job.id,
                publication.task.id,
                publication.merge.id,
                extra={"version": publication.task.id},
            )
            for warning in trained.result.warnings:
                log.warning("job %s (%s): %s", job.id, job.name, warning)
        except TrainingCancelled:
            if not claim_held():
                log.warning("job %s: claim lapsed during training; stopped without publishing", job.id)
            board.update_claimed(job.id, me, status=JobStatus.cancelled)
        except ClaimLost:
            log.warning("job %s: claim lapsed; stopped without publishing", job.id)
        except FenceLost as error:
            log.warning("job %s: claim lapsed while publishing; the store refused it: %s", job.id, error)
        except WouldForget as error:
            log.warning("job %s: %s", job.id, error)
            board.update_claimed(
                job.id,
                me,
                status=JobStatus.failed,
                metrics={
                    "evaluation_row": error.row,
                    "forgetting": error.drops,
                    **(
                        {"general_agreement": error.scores.general}
                        if error.scores.general is not None
                        else {}
                    ),
                    **({"general_drop": error.general_drop} if error.general_drop is not None else {}),
                },
                error=JobError(message=str(error), code=WOULD_FORGET),
            )
        except LiveChanged as error:
            log.error("job %s: %s", job.id, error)
            message = f"{error}; the live model changed again during the retry: post the task again"
            board.update_claimed(
                job.id, me, status=JobStatus.failed, error=JobError(message=message, code=STORE_CHANGED)
            )
        except DiskFull as error:
            log.error("job %s: %s", job.id, error)
            board.update_claimed(
                job.id, me, status=JobStatus.failed, error=JobError(message=str(error), code=DISK_FULL)
            )
        except AdmissionError as error:
            board.update_claimed(
                job.id,
                me,
                status=JobStatus.failed,
                error=JobError(message=error.message, param=error.param, code=error.code),
            )
        except Exception as error:
            log.exception("job %s failed", job.id)
            board.update_claimed(
                job.id,
                me,
                status=JobStatus.failed,
                error=JobError(message=f"{type(error).__name__}: {error}"),
            )


@contextmanager
def heartbeat(
    board: JobBoard, job_id: str, worker: str, lease_s: float, keep_lock: Callable[[], Any]
) -> Iterator[Callable[[], bool]]:
    """Renew the job's claim and the store lock every third of the lease from a thread, so the
    claim holds exactly as long as this process lives, however long one step takes. Yields a
    check that turns False once the claim is lost."""
    lost, stop = threading.Event(), threading.Event()

    def beat() -> None:
        while not stop.wait(lease_s / 3):
            try:
                if not board.renew(job_id, worker, lease_s):
                    lost.set()
                    return
            except UNAVAILABLE as error:  # the board's file system or database is away: try again
                log.warning("could not renew the claim on %s (%s); retrying", job_id, error)
            try:
                keep_lock()
            except Exception:  # Redis away: the board's lease still guards the store
                log.warning("could not extend the store lock", exc_info=True)

    thread = threading.Thread(target=beat, name=f"lease-{job_id}", daemon=True)
    thread.start()
    try:
        yield lambda: not lost.is_set()
    finally:
        stop.set()
        thread.join()


def _job_hooks(
    settings: LaminaSettings, board: JobBoard, job: Job, worker: str, claim_held: Callable[[], bool]
) -> Hooks:
    """The job board's part in :func:`trainer.publish.train_and_publish`: the job turns running
    once admitted (a refused one fails without loading the model), training reports progress and
    stops on a cancel or a lost claim, and right before publishing the claim is renewed (else
    :class:`ClaimLost`), a late cancel is honoured, and the claim's fence goes to the store."""
    from trainer.loop import TrainingCancelled
    from trainer.publish import Hooks

    def running() -> None:
        board.update_claimed(job.id, worker, status=JobStatus.running)

    def before_publish() -> Fence:
        if not claim_held() or not board.renew(job.id, worker, settings.job_lease_s):
            raise ClaimLost()
        if board.get(job.id).cancel_requested:
            raise TrainingCancelled()
        return board.fence(job, settings.job_lease_s)

    return Hooks(
        on_admitted=running,
        progress=_progress_reporter(board, job.id, worker),
        should_stop=_stop_checker(board, job.id, claim_held),
        before_publish=before_publish,
    )


def _progress_reporter(board: JobBoard, job_id: str, worker: str) -> Callable[[int, int, float], None]:
    curve = LossCurve()

    def report(step: int, total: int, loss: float) -> None:
        progress = Progress(step=step, total=total, loss=round(float(loss), 6))
        try:
            board.update_claimed(
                job_id, worker, progress=progress, loss_curve=curve.add(step, progress.loss or 0.0)
            )
        except UNAVAILABLE as error:  # progress is for people watching: the next report catches up
            log.warning("could not record the progress of %s (%s)", job_id, error)

    return report


class LossCurve:
    """A job's loss curve in at most ``limit`` points: every ``stride``-th step from the first,
    the stride doubling (and every other point going) whenever the curve fills, plus the latest
    point; so the board's record stays small while the curve spans the whole run evenly."""

    def __init__(self, limit: int = LOSS_CURVE_POINTS) -> None:
        self.limit, self.stride = limit, 1
        self.points: list[tuple[int, float]] = []
        self.latest: tuple[int, float] | None = None

    def add(self, step: int, loss: float) -> list[tuple[int, float]]:
        """Record one step; returns the curve as it stands."""
        first = self.points[0][0] if self.points else step
        if (step - first) % self.stride == 0:
            self.points.append((step, loss))
            if len(self.points) >= self.limit:
                self.stride *= 2
                self.points = [p for p in self.points if (p[0] - first) % self.stride == 0]
        self.latest = (step, loss)
        return self.points if self.points[-1] == self.latest else [*self.points, self.latest]


def _stop_checker(board: JobBoard, job_id: str, claim_held: Callable[[], bool]) -> Callable[[], bool]:
    """Stop on a cancel request (read at most every CANCEL_POLL_S) or a lost claim."""
    last = [0.0, False]

    def should_stop() -> bool:
        if time.monotonic() - last[0] >= CANCEL_POLL_S:
            last[0] = time.monotonic()
            try:
                last[1] = board.get(job_id).cancel_requested
            except UNAVAILABLE as error:  # a cancel is read at the next poll; the lease guards the rest
                log.warning("could not read %s's cancel request (%s)", job_id, error)
        return bool(last[1]) or not claim_held()

    return should_stop


@contextmanager
def store_turn(settings: LaminaSettings) -> Iterator[Any]:
    """Hold the store's training lock; yields a callable that keeps the lock alive."""
    url = settings.events_url
    if url:
        client = redis.Redis.from_url(url)
        # Not thread-local: the heartbeat thread extends the lock that this thread took.
        lock = client.lock(
            f"lamina:train-lock:{settings.store_location}",
            timeout=settings.job_lease_s,
            thread_local=False,
        )
        lock.acquire(blocking=True)
        try:
            yield lambda: lock.extend(settings.job_lease_s, replace_ttl=True)
        finally:
            try:
                lock.release()
            except redis.exceptions.RedisError:
                log.warning("training lock expired (or Redis restarted) before release")
    else:
        settings.store_dir.mkdir(parents=True, exist_ok=True)
        with locked_file(settings.store_dir / ".train.lock"):
            yield lambda: None
