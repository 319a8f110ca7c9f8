"""A fine-tuning job's events, from what the job board records.

The board keeps a job's timestamps, its latest progress (step, total, loss), its metrics,
warnings and error. Events are derived from those, with stable ids, so listing them twice gives
the same events. The board keeps only the latest progress, so the server also appends every
progress point it sees (whenever a client reads the job) to ``<store>/finetuning/events/`` and
lists those as loss events too: a client that polls sees a loss curve at its polling rate; one
that only reads the finished job sees the last step. With ``LAMINA_DATABASE_URL`` set the points
are rows in the database instead (:mod:`server.finetuning.events_database`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Protocol

from server.finetuning.mapping import openai_job_id, unix
from server.finetuning.protocol import FineTuneRecord, FineTuningJobEvent
from trainer.contract.jobs import Job, JobStatus


class ProgressPoints(Protocol):
    """Where the server records the progress points it sees: :class:`ProgressLog` or, across
    hosts, the database's :class:`server.finetuning.events_database.DatabaseProgressLog`."""

    def observe(self, job: Job) -> None: ...

    def points(self, job_id: str) -> list[dict]: ...


class ProgressLog:
    """Progress points seen per job, one JSON line each, appended (a line is one ``write``)."""

    def __init__(self, store_dir: Path) -> None:
        self.root = Path(store_dir) / "finetuning" / "events"
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, job_id: str) -> Path:
        return self.root / f"{job_id}.jsonl"  # job ids are checked by the board before they get here

    def observe(self, job: Job) -> None:
        if job.progress is None:
            return
        seen = self.points(job.id)
        if seen and seen[-1]["step"] == job.progress.step:
            return
        line = json.dumps({**job.progress.model_dump(), "at": int(time.time())}) + "\n"
        fd = os.open(self._path(job.id), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def points(self, job_id: str) -> list[dict]:
        try:
            text = self._path(job_id).read_text()
        except FileNotFoundError:
            return []
        points: dict[int, dict] = {}
        for line in text.splitlines():
            try:
                point = json.loads(line)
            except ValueError:  # a line being written
                continue
            points.setdefault(int(point["step"]), point)  # two servers may record one step
        return [points[step] for step in sorted(points)]


def job_events(job: Job, record: FineTuneRecord | None, points: list[dict]) -> list[FineTuningJobEvent]:
    """Every event of ``job``, newest first (as OpenAI lists them)."""
    ftjob = openai_job_id(job.id)
    created = unix(job.created_at) or 0
    events: list[FineTuningJobEvent] = []

    def add(key: str, at: int | None, message: str, level: str = "info", **extra: object) -> None:
        events.append(
            FineTuningJobEvent(
                id=f"ftevent-{ftjob.removeprefix('ftjob-')}-{key}",
                created_at=at if at is not None else created,
                level=level,  # type: ignore[arg-type]
                message=message,
                data=extra.get("data"),  # type: ignore[arg-type]
                type=extra.get("type", "message"),  # type: ignore[arg-type]
            )
        )

    add("created", created, f"Created fine-tuning job {ftjob}: task {job.name!r}, method {job.method}.")
    if record is not None and record.validation_file is not None:
        add(
            "validation-file",
            created,
            f"validation_file {record.validation_file} is the task's evaluation set: it is scored on it "
            "before it goes live and before every later publish.",
        )
    started = unix(job.started_at)
    if started is not None:
        add("started", started, "A worker took the job: checking the task against the store.")
    if job.progress is not None and not any(p["step"] == job.progress.step for p in points):
        points = [*points, {**job.progress.model_dump(), "at": unix(job.finished_at) or started}]
    for point in points:
        loss = point.get("loss")
        add(
            f"step-{point['step']}",
            point.get("at"),
            f"Step {point['step']}/{point['total']}: training loss={loss}",
            data={"step": point["step"], "total_steps": point["total"], "train_loss": loss},
            type="metrics",
        )
    finished = unix(job.finished_at)
    if job.status == JobStatus.succeeded:
        metrics = {
            k: job.metrics[k] for k in ("initial_loss", "final_loss", "train_accuracy") if k in job.metrics
        }
        add("metrics", finished, f"Training done: {metrics}", data=dict(job.metrics), type="metrics")
        for index, warning in enumerate(job.warnings):
            add(f"warning-{index}", finished, warning, "warn")
        add("succeeded", finished, f"The job has successfully completed: model {job.name!r} is served.")
    elif job.status == JobStatus.failed:
        message = job.error.message if job.error else "the job failed"
        add("failed", finished, f"The job failed: {message}", "error")
    elif job.status == JobStatus.cancelled:
        add("cancelled", finished, "The job was cancelled; nothing was published.")
    elif job.cancel_requested:
        add("cancel-requested", None, "Cancellation requested: training stops at its next step.")
    order = {event.id: index for index, event in enumerate(events)}  # ties: the order they happen in
    return sorted(events, key=lambda e: (e.created_at, order[e.id]), reverse=True)
