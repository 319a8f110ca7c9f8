"""The worker's last step on the embedded model: a publish that runs out of disk fails its job
with ``code: disk_full`` and leaves the store as it was; the next job publishes once space is
back. Training is real (two steps); only the store's write call fails, as a full disk makes it."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from adapters_store import lora as lora_module
from trainer import worker
from trainer.config import Example
from trainer.contract.board import DISK_FULL, JobBoard, JobStatus
from trainer.contract.settings import LaminaSettings

HP = {"steps": 2, "batch_size": 2, "r": 2, "learning_rate": 0.005, "seed": 0}
EXAMPLES = [Example("Word 1 means", " sun"), Example("Word 2 means", " moon")]


def train_next(settings: LaminaSettings, board: JobBoard, name: str) -> str:
    job_id = board.create(name, "lori-d", HP, EXAMPLES).id
    job = board.claim_next(worker.worker_name(), settings.job_lease_s)
    assert job is not None and job.id == job_id
    worker.run_job(settings, board, job, keep_lock=lambda: None)
    return job_id


def test_a_full_disk_fails_the_job_with_disk_full_and_the_next_job_publishes(
    base_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = LaminaSettings(model=base_model_dir, home=tmp_path, job_lease_s=60)
    board = JobBoard(settings.store_dir)
    real_save = lora_module.save_file

    def no_space(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        if "/merges/" in filename:  # the task version is already written: it must go too
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, filename, metadata)

    monkeypatch.setattr(lora_module, "save_file", no_space)
    failed = board.get(train_next(settings, board, "full"))
    assert failed.status == JobStatus.failed and failed.error is not None
    assert failed.error.code == DISK_FULL and "disk is full" in failed.error.message
    store = worker.open_store(settings)
    assert store.ledger() == [] and not list((settings.store_dir / "tasks").glob("*/v*"))
    assert not list((settings.store_dir / "merges").iterdir())

    monkeypatch.undo()  # space is back
    done = board.get(train_next(settings, board, "roomy"))
    assert done.status == JobStatus.succeeded, done.error
    assert [t.name for t in store.tasks()] == ["roomy"]
    assert store.ledger()[0]["fence"] == done.generation  # published under its claim
