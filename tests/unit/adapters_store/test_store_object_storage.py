"""A store whose files are in object storage (moto's S3 server) and whose ledger is in
PostgreSQL, opened by two "hosts": two local copies, no shared directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from adapters_store.blobs import ObjectStorage
from adapters_store.lora import LoraAdapter
from adapters_store.store import AdapterStore
from tests.support.store import FP, META, SHAPES, backend_options, make_adapter, visible_versions


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    return backend_options("object-storage", request)


@pytest.fixture
def hosts(tmp_path: Path, backend: dict[str, Any]) -> tuple[AdapterStore, AdapterStore]:
    return (
        AdapterStore(tmp_path / "host-a", FP, base_model="tiny-llama", **backend),
        AdapterStore(tmp_path / "host-b", FP, base_model="tiny-llama", **backend),
    )


def _same(a: LoraAdapter, b: LoraAdapter) -> bool:
    return all(torch.equal(a.modules[n].delta(), b.modules[n].delta()) for n in SHAPES)


def test_a_version_published_on_one_host_is_read_on_the_other(
    hosts: tuple[AdapterStore, AdapterStore],
) -> None:
    a, b = hosts
    assert not (b.root / "tasks" / "alpha").exists()
    published = a.publish("alpha", make_adapter(0), META, "concat")
    live = b.live()
    assert live is not None and live.id == published.merge.id and live.parents == ("alpha/v1",)
    merged = b.load_merge(live.id)
    assert isinstance(merged, LoraAdapter) and _same(merged, make_adapter(0))
    assert _same(b.task_adapter("alpha"), make_adapter(0))
    assert (b.root / "tasks/alpha/v1/adapter_model.safetensors").is_file()  # vLLM reads a plain directory


def test_a_half_uploaded_version_never_becomes_visible(
    hosts: tuple[AdapterStore, AdapterStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = hosts
    a.publish("alpha", make_adapter(0), META, "concat")
    ledger = b.ledger()
    real_put = ObjectStorage.upload

    def upload_one_file_then_die(self: ObjectStorage, directory: Path, files: dict[str, str]) -> int:
        real_put(self, directory, dict(list(files.items())[:1]))
        raise ConnectionError("the connection to the bucket dropped")

    monkeypatch.setattr(ObjectStorage, "upload", upload_one_file_then_die)
    with pytest.raises(ConnectionError):
        a.publish("beta", make_adapter(1), META, "concat")
    monkeypatch.undo()
    assert b.ledger() == ledger and [t.id for t in b.tasks()] == ["alpha/v1"]
    assert visible_versions(a.root) == [
        "merges/m1",
        "tasks/alpha/v1",
    ]  # nothing half-written left here either
    assert b.publish("beta", make_adapter(1), META, "concat").task.id == "beta/v1"
    assert [t.id for t in a.tasks()] == ["alpha/v1", "beta/v1"]


def test_version_numbers_come_from_the_ledger_not_the_local_copy(
    hosts: tuple[AdapterStore, AdapterStore],
) -> None:
    a, b = hosts
    a.publish("alpha", make_adapter(0), META, "concat")
    a.remove_task("alpha")
    # b has never read alpha/v1 or m1, so its local copy lacks them: the ledger still numbers them
    published = b.publish("alpha", make_adapter(1), META, "concat")
    assert published.task.id == "alpha/v2" and published.merge.id == "m2"


def test_a_local_copy_that_differs_from_the_ledger_is_replaced_from_the_bucket(
    hosts: tuple[AdapterStore, AdapterStore],
) -> None:
    a, b = hosts
    # b crashed once while publishing alpha/v1: its unpublished files are still in its local copy
    orphan = b.root / "tasks/alpha/v1"
    orphan.mkdir(parents=True)
    make_adapter(7).save_peft(orphan, base_model="tiny-llama")
    (orphan / "meta.json").write_text("{}")
    a.publish("alpha", make_adapter(0), META, "concat")
    assert _same(b.task_adapter("alpha"), make_adapter(0))
    # a damaged file in a host's copy is fetched again rather than served or refused
    weights = b.root / "tasks/alpha/v1/adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert _same(b.task_adapter("alpha"), make_adapter(0))


def test_objects_are_written_once_under_their_digest(
    hosts: tuple[AdapterStore, AdapterStore], backend: dict[str, Any]
) -> None:
    a, _ = hosts
    objects: ObjectStorage = backend["objects"]
    published = a.publish("alpha", make_adapter(0), META, "concat")
    stored = {Path(key).name for key in objects.fs.ls(objects.prefix)}
    assert published.task.files is not None and published.merge.files is not None
    assert stored == set(published.task.files.values()) | set(published.merge.files.values())
