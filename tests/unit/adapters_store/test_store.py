"""The adapter store: versions, ledger, refusals, crash safety, fingerprints and events."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from safetensors.torch import save_file

from adapters_store import ledger as ledger_module
from adapters_store.events import EventSubscriber, LedgerWatcher, publish_event, redis_notifier
from adapters_store.fingerprint import fingerprint_model
from adapters_store.lora import LoraAdapter
from adapters_store.merges import DenseDelta, MergeError, build_merge
from adapters_store.store import (
    AdapterStore,
    FingerprintMismatch,
    InvalidTaskName,
    MergeNotFound,
    TaskExists,
    TaskNotFound,
)
from tests.support.store import BACKENDS, FP, META, SHAPES, backend_options, make_adapter, visible_versions


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """One store's backends; the tests below run on each (tests/support/store.py)."""
    return backend_options(request.param, request)


@pytest.fixture
def store(tmp_path: Path, backend: dict[str, Any]) -> AdapterStore:
    return AdapterStore(tmp_path / "store", FP, base_model="tiny-llama", **backend)


def test_publish_two_tasks(store: AdapterStore) -> None:
    a, b = make_adapter(0, rank=2), make_adapter(1, rank=3)
    first = store.publish("alpha", a, META, "concat")
    second = store.publish("beta", b, META, "concat")

    assert [e["op"] for e in store.ledger()] == ["add_task", "set_live", "add_task", "set_live"]
    assert [e["seq"] for e in store.ledger()] == [1, 2, 3, 4]
    assert [t.id for t in store.tasks()] == ["alpha/v1", "beta/v1"]
    live = store.live()
    assert live is not None and live.id == second.merge.id != first.merge.id
    assert live.parents == ("alpha/v1", "beta/v1") and live.kind == "lora"
    assert live.meta["rank"] == 2 + 3
    assert json.loads((live.path / "adapter_config.json").read_text())["r"] == 5

    merged = store.load_merge(live.id)
    assert isinstance(merged, LoraAdapter)
    for name in SHAPES:
        torch.testing.assert_close(
            merged.modules[name].delta(), a.modules[name].delta() + b.modules[name].delta()
        )

    meta = store.tasks()[0].meta
    assert meta["base_fingerprint"] == FP and meta["method"] == "lori-s" and meta["version"] == 1
    history = store.history()
    assert len(history) == 2 and torch.equal(
        history[1].masks["model.layers.0.mlp.down_proj"], b.masks["model.layers.0.mlp.down_proj"]
    )
    assert torch.equal(
        store.task_adapter("alpha").modules["model.layers.0.self_attn.q_proj"].B,
        a.modules["model.layers.0.self_attn.q_proj"].B,
    )


def test_magnitude_merges_incrementally(store: AdapterStore) -> None:
    adapters = [make_adapter(s) for s in range(3)]
    for i, adapter in enumerate(adapters):
        store.publish(f"t{i}", adapter, META, "magnitude")
    live = store.live()
    assert live is not None and live.kind == "dense" and live.meta["based_on"] == "m2"
    expected = build_merge("magnitude", adapters)
    loaded = store.load_merge(live.id)
    assert isinstance(loaded, DenseDelta) and isinstance(expected, DenseDelta)
    for name in SHAPES:
        assert torch.equal(loaded.deltas[name], expected.deltas[name])


@pytest.mark.parametrize("fail_at", ["task", "merge", "ledger"])
def test_crash_during_publish_leaves_nothing_visible(
    store: AdapterStore, backend: dict[str, Any], monkeypatch: pytest.MonkeyPatch, fail_at: str
) -> None:
    store.publish("alpha", make_adapter(0), META, "concat")
    before_ledger, before_files = store.ledger(), visible_versions(store.root)

    real_save = LoraAdapter.save_peft
    calls = []

    def failing_save(self: LoraAdapter, directory: Path, base_model: str) -> None:
        calls.append(directory)
        real_save(self, directory, base_model)  # half-written: the files exist, then we die
        if (fail_at == "task" and len(calls) == 1) or (fail_at == "merge" and len(calls) == 2):
            raise OSError("disk full")

    def failing_append(self: object, entries: list[dict], guard: object = None) -> list[dict]:
        raise OSError("disk full")

    monkeypatch.setattr(LoraAdapter, "save_peft", failing_save)
    if fail_at == "ledger":
        monkeypatch.setattr(
            type(backend["ledger"]) if backend else ledger_module.Ledger, "append", failing_append
        )
    with pytest.raises(OSError, match="disk full"):
        store.publish("beta", make_adapter(1), META, "concat")

    assert store.ledger() == before_ledger
    assert visible_versions(store.root) == before_files
    live = store.live()
    assert live is not None and live.parents == ("alpha/v1",)
    monkeypatch.undo()
    assert store.publish("beta", make_adapter(1), META, "concat").task.id == "beta/v1"


@pytest.mark.parametrize(
    "name",
    ["../x", "/abs", "A", "a/b", "a.b", "..", "", "-a", "\u0430lpha", "ａlpha", "a" * 65, "x\n", "a b"],
)
def test_bad_names_are_refused(store: AdapterStore, name: str) -> None:
    with pytest.raises(InvalidTaskName):
        store.publish(name, make_adapter(0), META, "concat")
    assert store.ledger() == [] and visible_versions(store.root) == []


def test_longest_valid_name_is_accepted(store: AdapterStore) -> None:
    assert store.publish("a" * 64, make_adapter(0), META, "concat").task.name == "a" * 64


def test_duplicate_live_task_is_refused(store: AdapterStore) -> None:
    store.publish("alpha", make_adapter(0), META, "concat")
    with pytest.raises(TaskExists):
        store.publish("alpha", make_adapter(1), META, "concat")
    assert len(store.ledger()) == 2


def test_fingerprint_mismatch_is_refused(store: AdapterStore, backend: dict[str, Any]) -> None:
    with pytest.raises(FingerprintMismatch):
        AdapterStore(store.root, "ffffffffffffffff", **backend)
    with pytest.raises(FingerprintMismatch):
        store.publish("alpha", make_adapter(0), {**META, "base_fingerprint": "ffffffffffffffff"}, "concat")
    assert store.ledger() == []


def test_bad_merge_arguments_write_nothing(store: AdapterStore) -> None:
    with pytest.raises(MergeError):
        store.publish("alpha", make_adapter(0), META, "no-such-merge")
    with pytest.raises(MergeError):
        store.publish("alpha", make_adapter(0), META, "concat", weights=[1.0, 2.0])
    assert store.ledger() == [] and visible_versions(store.root) == []


def test_remove_task_and_rollback(store: AdapterStore) -> None:
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        store.publish(name, make_adapter(i), META, "concat", weights=[1.0] * i + [0.5])
    removed = store.remove_task("beta")
    assert removed is not None and removed.parents == ("alpha/v1", "gamma/v1")
    assert removed.meta["weights"] == [1.0, 0.5]  # beta's weight left with it
    assert [t.name for t in store.tasks()] == ["alpha", "gamma"]
    with pytest.raises(TaskNotFound):
        store.task_adapter("beta")

    back = store.rollback("m2")
    assert store.live() == back and back.parents == ("alpha/v1", "beta/v1")
    assert [t.name for t in store.tasks()] == ["alpha", "beta"]
    with pytest.raises(MergeNotFound):
        store.rollback("m99")
    with pytest.raises(MergeNotFound):
        store.rollback("../m1")

    store.remove_task("beta")
    again = store.publish("beta", make_adapter(9), META, "concat")
    assert again.task.id == "beta/v2"
    assert [t.id for t in store.task_versions("beta")] == ["beta/v1", "beta/v2"]
    ops = [(e["op"], e.get("cause")) for e in store.ledger()[6:]]
    assert ops == [
        ("remove_task", None),
        ("set_live", "remove_task"),
        ("rollback", None),
        ("set_live", "rollback"),
        ("remove_task", None),
        ("set_live", "remove_task"),
        ("add_task", None),
        ("set_live", "add_task"),
    ]


def test_removing_the_last_task_serves_the_base_model(store: AdapterStore) -> None:
    store.publish("alpha", make_adapter(0), META, "magnitude")
    assert store.remove_task("alpha") is None
    assert store.live() is None and store.tasks() == []
    assert store.publish("beta", make_adapter(1), META, "magnitude").merge.meta["based_on"] is None


def test_torn_ledger_line_is_ignored_then_repaired(tmp_path: Path) -> None:
    """The file ledger's crash case (the database's append is one transaction)."""
    store = AdapterStore(tmp_path / "store", FP)
    store.publish("alpha", make_adapter(0), META, "concat")
    with (store.root / "ledger.jsonl").open("a") as f:
        f.write('{"seq": 3, "op": "add_ta')  # a crash in the middle of a write
    assert len(store.ledger()) == 2
    store.publish("beta", make_adapter(1), META, "concat")
    assert [e["seq"] for e in store.ledger()] == [1, 2, 3, 4]


def test_concurrent_publishes_serialize(tmp_path: Path, backend: dict[str, Any]) -> None:
    """Two store objects (as two workers would have) publishing at once: both land, in order.
    With the files in object storage each has its own local copy, as on two hosts."""
    roots = [tmp_path / "a", tmp_path / "b"] if "objects" in backend else [tmp_path / "store"] * 2
    stores = [AdapterStore(root, FP, **backend) for root in roots]
    errors: list[BaseException] = []

    def publish(i: int) -> None:
        try:
            stores[i].publish(f"t{i}", make_adapter(i), META, "concat")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    live = stores[0].live()
    assert live is not None and len(live.parents) == 2 and live.meta["rank"] == 4


# --- fingerprints ----------------------------------------------------------------------


def write_model(directory: Path, config: dict, weights: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(weights, str(directory / "model.safetensors"))
    return directory


def test_fingerprint_is_stable_and_sensitive(tmp_path: Path) -> None:
    weights = {"embed.weight": torch.arange(12.0).reshape(3, 4), "head.weight": torch.ones(4, 3)}
    config = {"model_type": "llama", "hidden_size": 4}
    base = fingerprint_model(write_model(tmp_path / "a", config, weights))
    assert len(base) == 16 and base == fingerprint_model(tmp_path / "a")

    reformatted = write_model(tmp_path / "b", config, weights)
    (reformatted / "config.json").write_text(json.dumps(config, indent=4, sort_keys=True))
    assert fingerprint_model(reformatted) == base

    changed = dict(weights, **{"head.weight": torch.ones(4, 3) * 1.001})
    assert fingerprint_model(write_model(tmp_path / "c", config, changed)) != base
    assert fingerprint_model(write_model(tmp_path / "d", {**config, "hidden_size": 8}, weights)) != base
    assert fingerprint_model(tmp_path / "a", full_hash_limit=0) != base  # the mode is in the digest


def test_fingerprint_needs_a_model(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        fingerprint_model(tmp_path)


# --- events ------------------------------------------------------------------------------

REDIS_URL = os.environ.get("LAMINA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis not reachable at {REDIS_URL} ({exc}); set LAMINA_TEST_REDIS_URL")
    return REDIS_URL


def test_event_round_trip_through_redis(tmp_path: Path, redis_url: str) -> None:
    root = tmp_path / "store"
    with (
        EventSubscriber(redis_url, root) as subscriber,
        EventSubscriber(redis_url, tmp_path / "other") as other,
    ):
        assert publish_event(redis_url, root, {"op": "ping"}) >= 1
        assert subscriber.get(timeout=5) == {"op": "ping"}

        store = AdapterStore(root, FP, on_event=redis_notifier(redis_url, root))
        publication = store.publish("alpha", make_adapter(0), META, "concat")
        event = subscriber.get(timeout=5)
        assert event is not None and event["op"] == "set_live" and event["merge"] == publication.merge.id
        assert other.get(timeout=0.2) is None  # another store's channel stays quiet


def test_store_survives_a_failing_notifier(tmp_path: Path) -> None:
    def broken(event: dict) -> None:
        raise ConnectionError("redis down")

    store = AdapterStore(tmp_path / "store", FP, on_event=broken)
    assert store.publish("alpha", make_adapter(0), META, "concat").merge.id == "m1"


def test_ledger_watcher_sees_each_change(store: AdapterStore) -> None:
    watcher = LedgerWatcher(store)
    assert not watcher.poll()
    store.publish("alpha", make_adapter(0), META, "concat")
    assert watcher.poll()
    assert not watcher.poll()
