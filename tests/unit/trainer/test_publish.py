"""trainer.publish.train_and_publish, the one path a task takes into a store (the worker's and the
benchmark's), on the embedded model: the steps run in their order, a refused task loads no model,
a refusal right before publishing leaves the store as it was, and the admission limits the caller
passes are the ones admission applies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from adapters_store.store import AdapterStore
from trainer.config import Example, Hyperparameters, resolve_method
from trainer.contract.admission import AdmissionError, AdmissionReason
from trainer.loop import load_base
from trainer.publish import Hooks, data_hash, train_and_publish

HP = Hyperparameters(steps=2, batch_size=2, r=2, lora_alpha=4, learning_rate=0.005, seed=0)
EXAMPLES = [Example("Word 1 means", " sun"), Example("Word 2 means", " moon")]


@pytest.fixture(scope="module")
def base(base_model_dir: Path) -> Any:
    return load_base(base_model_dir)


class Claim:
    """A claim that holds, as the worker's ClaimFence does while its lease lasts."""

    token = 7

    def holds(self) -> bool:
        return True


class Lapsed(Exception):
    """What a caller's before_publish raises when it must not publish."""


def test_the_steps_run_in_order_and_the_publish_records_the_request_and_the_fence(
    base: Any, tmp_path: Path
) -> None:
    store = AdapterStore(tmp_path, "fp")
    events: list[str] = []

    def load() -> Any:
        events.append("load")
        return base

    def before_publish() -> Claim:
        assert store.tasks() == [], "nothing is published before the last hook"
        events.append("before_publish")
        return Claim()

    hooks = Hooks(
        on_admitted=lambda: events.append("admitted"),
        progress=lambda step, total, loss: events.append("step"),
        before_publish=before_publish,
    )
    trained, publication = train_and_publish(
        store,
        "first",
        EXAMPLES,
        resolve_method("lori-d"),
        HP,
        load,
        max_lora_rank=8,
        hooks=hooks,
        extra_meta={"job_id": "j1"},
    )
    assert events[:2] == ["admitted", "load"] and events[-1] == "before_publish"
    assert events.count("step") >= 1 and set(events[2:-1]) == {"step"}
    (task,) = store.tasks()
    assert task.id == publication.task.id and store.live() is not None
    assert store.live().id == publication.merge.id  # type: ignore[union-attr]
    assert task.meta["requested_rank"] == HP.r and task.meta["job_id"] == "j1"
    assert task.meta["data_hash"] == data_hash(EXAMPLES) and task.meta["method"] == "lori-d"
    assert task.meta["metrics"] == trained.result.metrics
    assert 7 in [entry.get("fence") for entry in store.ledger()]


def test_a_refused_task_loads_no_model_and_calls_no_hook(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, "fp")
    calls: list[str] = []

    def load() -> Any:
        calls.append("load")
        raise AssertionError("a refused task must not load the model")

    hooks = Hooks(
        on_admitted=lambda: calls.append("admitted"), before_publish=lambda: calls.append("publish")
    )
    with pytest.raises(AdmissionError) as refused:  # concat rank 16 > the engine's 8
        train_and_publish(
            store,
            "big",
            EXAMPLES,
            resolve_method("lori-d"),
            HP.model_copy(update={"r": 16}),
            load,
            max_lora_rank=8,
            hooks=hooks,
        )
    assert refused.value.reason == AdmissionReason.rank_exceeded
    assert calls == [] and store.ledger() == []


def test_a_refusal_right_before_publishing_leaves_the_store_as_it_was(base: Any, tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, "fp")

    def refuse() -> None:
        raise Lapsed()

    with pytest.raises(Lapsed):
        train_and_publish(
            store,
            "late",
            EXAMPLES,
            resolve_method("lori-d"),
            HP,
            lambda: base,
            max_lora_rank=8,
            hooks=Hooks(before_publish=refuse),
        )
    assert store.ledger() == [] and store.tasks() == [] and store.live() is None


@pytest.mark.parametrize("grow", [0, 2])
def test_loraf_grows_only_with_the_grow_rank_the_caller_passes(base: Any, tmp_path: Path, grow: int) -> None:
    """Two LoRAF tasks that each want 60 % of B: the second fits only if the store may grow."""
    store = AdapterStore(tmp_path, "fp")
    hp = HP.model_copy(update={"mask_fraction": 0.6, "calibration_steps": 1})
    loraf = resolve_method("loraf")
    train_and_publish(
        store, "first", EXAMPLES, loraf, hp, lambda: base, max_lora_rank=64, loraf_grow_rank=grow
    )
    if grow == 0:
        with pytest.raises(AdmissionError) as refused:
            train_and_publish(store, "second", EXAMPLES, loraf, hp, lambda: base, max_lora_rank=64)
        assert refused.value.reason == AdmissionReason.capacity_exceeded
        assert [t.name for t in store.tasks()] == ["first"]
        return
    trained, _ = train_and_publish(
        store, "second", EXAMPLES, loraf, hp, lambda: base, max_lora_rank=64, loraf_grow_rank=grow
    )
    assert trained.hyperparameters.r == HP.r + grow
    assert store.tasks()[-1].meta["requested_rank"] == HP.r
    grows = [e for e in store.ledger() if e["op"] == "grow"]
    assert [(e["rank_from"], e["rank_to"]) for e in grows] == [(HP.r, HP.r + grow)]
