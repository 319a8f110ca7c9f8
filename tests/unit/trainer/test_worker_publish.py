"""The worker's run_job on the embedded model: a publish that runs out of disk fails its job
with ``code: disk_full`` and leaves the store as it was, and the next job publishes once space is
back (training is real, two steps; only the store's write call fails, as a full disk makes it);
a job admission refuses under the worker's settings fails without loading the model; a job
cancelled after its claim stops without publishing."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from adapters_store import lora as lora_module
from trainer import regression, worker
from trainer.config import Example
from trainer.contract.board import DISK_FULL, JobBoard, JobStatus
from trainer.contract.settings import LaminaSettings

HP = {"steps": 2, "batch_size": 2, "r": 2, "learning_rate": 0.005, "seed": 0}
EXAMPLES = [Example("Word 1 means", " sun"), Example("Word 2 means", " moon")]


def train_next(
    settings: LaminaSettings, board: JobBoard, name: str, hp: dict | None = None, cancel: bool = False
) -> str:
    job_id = board.create(name, "lori-d", hp or HP, EXAMPLES).id
    job = board.claim_next(worker.worker_name(), settings.job_lease_s)
    assert job is not None and job.id == job_id
    if cancel:
        board.request_cancel(job_id)
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


def test_a_job_admission_refuses_fails_without_loading_the_model(
    base_model_dir: Path, tmp_path: Path
) -> None:
    """max_lora_rank comes from the worker's settings: rank 16 does not fit an engine of rank 8."""
    settings = LaminaSettings(model=base_model_dir, home=tmp_path, job_lease_s=60, max_lora_rank=8)
    board = JobBoard(settings.store_dir)
    worker._base_model.cache_clear()
    refused = board.get(train_next(settings, board, "wide", {**HP, "r": 16}))
    assert refused.status == JobStatus.failed and refused.error is not None
    assert refused.error.code == "rank_exceeded" and refused.error.param == "hyperparameters.r"
    assert worker._base_model.cache_info().currsize == 0, "the model was loaded for a refused task"
    assert worker.open_store(settings).ledger() == []


def test_a_job_cancelled_after_its_claim_publishes_nothing(base_model_dir: Path, tmp_path: Path) -> None:
    settings = LaminaSettings(model=base_model_dir, home=tmp_path, job_lease_s=60)
    board = JobBoard(settings.store_dir)
    cancelled = board.get(train_next(settings, board, "stopped", cancel=True))
    assert cancelled.status == JobStatus.cancelled and cancelled.task_version is None
    assert worker.open_store(settings).ledger() == []


def test_a_rollback_while_a_task_trains_makes_it_train_again_on_the_live_tasks(
    base_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, an admin rollback during an inflora job let it publish a basis grown from a merge
    that was no longer live, leaving the task the rollback restored unprotected."""
    from trainer import publish as publish_module

    settings = LaminaSettings(model=base_model_dir, home=tmp_path, job_lease_s=60)
    board = JobBoard(settings.store_dir)
    for name in ("first", "second"):
        assert board.get(train_next(settings, board, name)).status == JobStatus.succeeded
    store = worker.open_store(settings)
    first_merge = store.merges()[0].id
    real_train = publish_module.train_for_store
    trained_after: list[tuple[str, ...]] = []

    def rollback_while_training(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        trained = real_train(*args, **kwargs)
        trained_after.append(trained.trained_on)
        if len(trained_after) == 1:
            store.rollback(first_merge)  # the admin acts while the first attempt trains
        return trained

    monkeypatch.setattr(publish_module, "train_for_store", rollback_while_training)
    done = board.get(train_next(settings, board, "third"))
    assert done.status == JobStatus.succeeded, done.error
    assert trained_after == [("first/v1", "second/v1"), ("first/v1",)]  # trained again on what is live
    assert store.live().parents == ("first/v1", "third/v1")  # type: ignore[union-attr]


def test_a_task_that_would_overwrite_an_earlier_one_is_refused_and_a_harmless_one_publishes(
    base_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The regression gate (trainer/regression.py) with real training: the same prompts taught
    other answers, served through the merge (routing off) by a method that forgets (lori-d: its
    merge is the plain sum), is refused; a task on other prompts publishes under task routing,
    where each task's prompts keep their own model. The gate judges `continual` as it is served."""
    routed = LaminaSettings(model=base_model_dir, home=tmp_path, job_lease_s=120)
    merged = routed.model_copy(update={"continual_routing": "off"})  # every prompt served by the merge
    settings = merged.model_copy(update={"max_general_drop": 100.0})  # this test is about the tasks
    board = JobBoard(settings.store_dir)
    learn = {"steps": 40, "batch_size": 4, "r": 4, "learning_rate": 0.02, "seed": 0}
    colours = [
        Example(f"Item {i} has colour", f" {c}") for i, c in enumerate(["red", "blue", "green", "red"])
    ]
    swapped = [Example(e.prompt, " yellow") for e in colours]
    sizes = [Example(f"Box {i} is", f" {s}") for i, s in enumerate(["big", "small", "big", "small"])]

    def post(name: str, examples: list[Example], under: LaminaSettings = settings, **extra):  # noqa: ANN202
        job_id = board.create(name, "lori-d", learn, examples, **extra).id
        job = board.claim_next(worker.worker_name(), under.job_lease_s)
        assert job is not None and job.id == job_id
        worker.run_job(under, board, job, keep_lock=lambda: None)
        return board.get(job_id)

    # Served through the merge, a task moves what the base answered to other prompts: refused.
    general = post("colours", colours, under=merged)
    assert general.status == JobStatus.failed and general.error is not None
    assert general.error.code == "would_forget" and "LAMINA_MAX_GENERAL_DROP" in general.error.message
    assert general.metrics["general_drop"] > 3 and general.metrics["general_agreement"] < 97
    assert worker.open_store(settings).tasks() == []

    first = post("colours", colours)
    assert first.status == JobStatus.succeeded, first.error
    store = worker.open_store(settings)
    assert store.tasks()[0].meta["evaluation"]["row"] == {"colours": 100.0}  # it learned its examples

    refused = post("overwrite", swapped)
    assert refused.status == JobStatus.failed and refused.error is not None
    assert refused.error.code == "would_forget" and "colours 100 %" in refused.error.message
    assert refused.metrics["forgetting"]["colours"] > 2
    assert [t.name for t in store.tasks()] == ["colours"]  # the live model is as it was

    own_set = [Example("Box 1 is", " small"), Example("Box 2 is", " big")]  # the user's validation set
    harmless = post("sizes", sizes, under=routed, validation=own_set)
    assert harmless.status == JobStatus.succeeded, harmless.error
    assert harmless.n_validation_examples == 2
    evaluation = store.tasks()[-1].meta["evaluation"]
    assert [(e["prompt"], e["completion"]) for e in evaluation["examples"]] == [
        ("Box 1 is", " small"),
        ("Box 2 is", " big"),
    ]
    row = evaluation["row"]
    assert set(row) == {"colours", "sizes"} and row["colours"] >= 98.0
    # Under task routing most general prompts reach the base itself: its answers stay.
    assert evaluation["general"]["agreement"] >= 97 and evaluation["general"]["n"] > 100
    assert harmless.metrics["general_agreement"] == evaluation["general"]["agreement"]
    assert harmless.metrics["validation_accuracy"] == row["sizes"] / 100
    assert harmless.metrics["regression_seconds"] > 0

    # The next check decodes again only what new weights answer: colours' prompts still go to
    # colours/v1 (a version never changes), so its recorded results are reused, not decoded.
    decoded: list[str] = []
    decode = regression.greedy_completions

    def counting(model, tokenizer, prompts, budget):  # noqa: ANN001, ANN202
        decoded.extend(tokenizer.decode(p) if not isinstance(p, str) else p for p in prompts)
        return decode(model, tokenizer, prompts, budget)

    monkeypatch.setattr(regression, "greedy_completions", counting)
    shapes = [Example(f"Shape {i} is", f" {s}") for i, s in enumerate(["round", "square", "round", "square"])]
    third = post("shapes", shapes, under=routed)
    assert third.status == JobStatus.succeeded, third.error
    assert decoded and not any("has colour" in text for text in decoded), decoded
    latest = store.tasks()[-1].meta["evaluation"]
    assert latest["row"]["colours"] == row["colours"]
    assert set(latest["details"]["tasks"]) == {"colours/v1", "sizes/v1"}


def test_the_check_before_publishing_can_be_turned_off(base_model_dir: Path, tmp_path: Path) -> None:
    settings = LaminaSettings(model=base_model_dir, home=tmp_path, forgetting_policy="off")
    assert worker.gate_for(settings) is None
    gate = worker.gate_for(settings.model_copy(update={"forgetting_policy": "warn", "max_forgetting": 5.0}))
    assert gate is not None and (gate.routing, gate.max_forgetting, gate.policy, gate.max_general_drop) == (
        "task",
        5.0,
        "warn",
        3.0,
    )


def test_a_task_for_every_prompt_changes_general_answers_with_a_warning_not_a_refusal(
    base_model_dir: Path, tmp_path: Path
) -> None:
    """A style (applies_to: all) is meant to change every answer: served for every prompt, it
    moves the base's general answers far past LAMINA_MAX_GENERAL_DROP and publishes, saying so."""
    settings = LaminaSettings(model=base_model_dir, home=tmp_path, job_lease_s=120)
    board = JobBoard(settings.store_dir)
    hp = {"steps": 40, "batch_size": 4, "r": 4, "learning_rate": 0.02, "seed": 0, "applies_to": "all"}
    style = [Example(f"Item {i} has colour", " yellow") for i in range(4)]
    job_id = board.create("yellow", "lori-d", hp, style).id
    job = board.claim_next(worker.worker_name(), settings.job_lease_s)
    assert job is not None and job.id == job_id
    worker.run_job(settings, board, job, keep_lock=lambda: None)
    done = board.get(job_id)
    assert done.status == JobStatus.succeeded, done.error
    assert done.metrics["general_agreement"] < 100 - settings.max_general_drop
    assert any(
        w.startswith("this task applies to every prompt, so it changes general answers")
        for w in done.warnings
    )
