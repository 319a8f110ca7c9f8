"""The worker's whole job path on the multi-host backends: settings that name a database and a
bucket give a job board in PostgreSQL and a store whose files are in object storage (moto), and a
real (two-step) training job claimed there publishes under its claim; another host, with a home
of its own, sees the job and reads the published version from the bucket."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.object_storage import S3Server
from tests.support.database import unique_store
from trainer import worker
from trainer.config import Example
from trainer.contract.backends import database_problem, open_board
from trainer.contract.board import JobStatus
from trainer.contract.settings import LaminaSettings

HP = {"steps": 2, "batch_size": 2, "r": 2, "learning_rate": 0.005, "seed": 0}
EXAMPLES = [Example("Word 1 means", " sun"), Example("Word 2 means", " moon")]


def settings_on(
    home: Path, base_model_dir: Path, database_url: str, store: str, s3: S3Server
) -> LaminaSettings:
    return LaminaSettings(
        model=base_model_dir,
        home=home,
        database_url=database_url,
        store=store,
        s3_endpoint_url=s3.endpoint_url,
        job_lease_s=60,
        forgetting_policy="off",
    )


def test_a_job_trained_on_one_host_is_published_for_every_host(
    base_model_dir: Path, tmp_path: Path, database_url: str, s3: S3Server
) -> None:
    store_url = f"{s3.store_url()}-{unique_store()}"
    here = settings_on(tmp_path / "host-a", base_model_dir, database_url, store_url, s3)
    there = settings_on(tmp_path / "host-b", base_model_dir, database_url, store_url, s3)
    board = open_board(here)
    job_id = board.create("sun", "lori-d", HP, EXAMPLES).id
    job = board.claim_next(worker.worker_name(), here.job_lease_s)
    assert job is not None and job.id == job_id
    worker.run_job(here, board, job, keep_lock=lambda: None)

    done = open_board(there).get(job_id)  # the other host's board is the same rows
    assert done.status == JobStatus.succeeded, done.error
    store = worker.open_store(there)
    assert [t.id for t in store.tasks()] == ["sun/v1"] == [done.task_version]
    assert store.ledger()[0]["fence"] == done.generation  # published under its claim
    assert (there.store_dir / "tasks/sun/v1/adapter_model.safetensors").is_file()  # fetched for host b
    assert not (here.store_dir / "ledger.jsonl").exists()  # nothing of the ledger is kept in files


def test_an_object_store_without_a_database_is_refused_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="LAMINA_DATABASE_URL"):
        LaminaSettings(home=tmp_path, store="s3://bucket/prefix")


def test_a_database_that_is_not_postgresql_is_refused_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="PostgreSQL URL"):
        LaminaSettings(home=tmp_path, database_url="mysql://lamina@db/lamina")


def test_an_unreachable_database_stops_serve_and_worker_at_start_with_one_line(
    tmp_path: Path, database_url: str
) -> None:
    assert database_problem(LaminaSettings(home=tmp_path, database_url=database_url)) is None
    env = {
        **os.environ,
        "LAMINA_HOME": str(tmp_path),
        "LAMINA_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x",
    }
    for command in (["lamina", "serve"], ["lamina-worker"]):
        done = subprocess.run(
            [str(Path(sys.executable).parent / command[0]), *command[1:]],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr[-2000:]
        assert "LAMINA_DATABASE_URL: cannot reach PostgreSQL" in done.stderr.strip().splitlines()[-1]


def test_each_store_in_a_bucket_has_a_local_copy_of_its_own(tmp_path: Path) -> None:
    """A user who points LAMINA_STORE at another bucket under the same home gets a new copy: the
    first store's m1 is never taken for the second's, nor does it push the second's numbers on."""
    url = "postgresql://lamina@db/lamina"
    first = LaminaSettings(home=tmp_path, database_url=url, store="s3://bucket/one")
    second = LaminaSettings(home=tmp_path, database_url=url, store="s3://bucket/two")
    assert first.store_dir != second.store_dir
    assert {first.store_dir.parent, second.store_dir.parent} == {tmp_path / "copies"}
    assert LaminaSettings(home=tmp_path).store_dir == tmp_path / "store"
