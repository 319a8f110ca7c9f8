"""What the store refuses to read or write: versions whose files are not the ones their ledger
entry recorded (truncated, flipped, missing, another base model), publishes whose claim lapsed
(the fence), and publishes that run out of disk; plus ``snapshot()``, the one-read view."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from adapters_store import ledger as ledger_module
from adapters_store import lora as lora_module
from adapters_store.errors import CorruptVersion, DiskFull, FenceLost, FingerprintMismatch
from adapters_store.merges import DenseDelta, build_merge
from adapters_store.store import AdapterStore
from adapters_store.subspace import Subspace
from tests.support.store import FP, META, make_adapter, visible_versions

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "store", FP, base_model="tiny-llama")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor: a silent change of one weight
    path.write_bytes(bytes(data))


# --- snapshot --------------------------------------------------------------------------


def test_snapshot_reads_merge_tasks_and_seq_from_one_ledger_read(
    store: AdapterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (store.snapshot().live, store.snapshot().tasks, store.snapshot().seq) == (None, [], 0)
    store.publish("alpha", make_adapter(0), META, "concat")
    store.publish("beta", make_adapter(1), META, "concat")

    reads = []
    real_read = ledger_module.Ledger.read
    monkeypatch.setattr(ledger_module.Ledger, "read", lambda self: reads.append(1) or real_read(self))
    snapshot = store.snapshot()
    assert len(reads) == 1
    assert snapshot.seq == 4 and snapshot.live is not None and snapshot.live.id == "m2"
    assert tuple(t.id for t in snapshot.tasks) == snapshot.live.parents == ("alpha/v1", "beta/v1")


# --- checksums -------------------------------------------------------------------------


def test_every_file_of_a_version_is_recorded_in_its_ledger_entry(store: AdapterStore) -> None:
    publication = store.publish("alpha", make_adapter(0), META, "concat", as_learned=True)
    add, set_live = store.ledger()
    task_dir, merge_dir = publication.task.path, publication.merge.path
    assert sorted(add["files"]) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "as_learned/adapter_config.json",
        "as_learned/adapter_model.safetensors",
        "as_learned/masks.safetensors",
        "masks.safetensors",
        "meta.json",
    ]
    assert all(add["files"][f] == sha256(task_dir / f) for f in add["files"])
    on_disk = sorted(p.relative_to(merge_dir).as_posix() for p in merge_dir.rglob("*") if p.is_file())
    assert sorted(set_live["files"]) == on_disk and "meta.json" in on_disk
    assert all(set_live["files"][f] == sha256(merge_dir / f) for f in set_live["files"])
    assert publication.task.files == add["files"] and publication.merge.files == set_live["files"]


def inflora_store(store: AdapterStore) -> None:
    """Two inflora-like publishes: m2's basis extends m1's (its file names m1 as parent)."""
    basis = Subspace({Q: torch.linalg.qr(torch.randn(10, 3))[0]}, 0.9)
    store.publish("alpha", make_adapter(0), META, "concat", subspace=basis)
    live = store.subspace()
    assert live is not None
    store.publish("beta", make_adapter(1), META, "concat", subspace=live.unchanged())


@pytest.mark.parametrize(
    ("where", "damage"),
    [
        ("tasks/beta/v1/adapter_model.safetensors", truncate),
        ("tasks/beta/v1/adapter_model.safetensors", flip),
        ("tasks/beta/v1/masks.safetensors", Path.unlink),
        ("tasks/alpha/v1/adapter_config.json", flip),
    ],
)
def test_a_damaged_task_version_is_refused_and_nothing_builds_on_it(
    store: AdapterStore, where: str, damage: object, caplog: pytest.LogCaptureFixture
) -> None:
    store.publish("alpha", make_adapter(0), META, "concat")
    store.publish("beta", make_adapter(1), META, "concat")
    ledger, files = store.ledger(), visible_versions(store.root)
    damage(store.root / where)  # type: ignore[operator]
    name = where.split("/")[-1]

    with (
        caplog.at_level(logging.ERROR, logger="adapters_store.store"),
        pytest.raises(CorruptVersion, match=name),
    ):
        store.verify(store.live(), *store.tasks())
    assert f"refusing task {where.split('/')[1]}/v1" in caplog.text
    with pytest.raises(CorruptVersion, match=name):
        store.history()  # what the trainer reads for the next task
    task = where.split("/")[1]
    # the job's error names the admin action that repairs it
    with pytest.raises(CorruptVersion, match=rf"{name}.*to repair: remove it \(DELETE /admin/tasks/{task}"):
        store.publish("gamma", make_adapter(2), META, "concat")
    assert store.ledger() == ledger and visible_versions(store.root) == files


def test_a_damaged_merge_adapter_is_never_served_but_does_not_block_the_next_task(
    store: AdapterStore,
) -> None:
    """The merge's adapter is derived data: the next publish rebuilds the merge from its tasks'
    own (verified) files. Before, the damaged m2 made every later inflora job fail CorruptVersion."""
    inflora_store(store)
    flip(store.root / "merges/m2/adapter_model.safetensors")
    with pytest.raises(CorruptVersion, match="adapter_model.safetensors"):
        store.verify(store.live())  # what a server checks before it loads the merge
    live = store.subspace()  # what the next inflora job reads
    assert live is not None
    published = store.publish("gamma", make_adapter(2), META, "concat", subspace=live.unchanged())
    assert published.merge.id == "m3" and published.merge.parents == ("alpha/v1", "beta/v1", "gamma/v1")
    store.verify(store.live(), *store.tasks())


@pytest.mark.parametrize(
    ("where", "damage"),
    [
        ("merges/m2/subspace.safetensors", Path.unlink),  # the live basis
        ("merges/m1/subspace.safetensors", truncate),  # the basis the live one extends
    ],
)
def test_a_damaged_basis_is_refused(store: AdapterStore, where: str, damage: object) -> None:
    inflora_store(store)
    damage(store.root / where)  # type: ignore[operator]
    name = where.split("/")[-1]
    with pytest.raises(CorruptVersion, match=name):
        store.subspace()
    if where.startswith("merges/m2"):
        with pytest.raises(CorruptVersion, match=name):
            store.verify(store.live())
        with pytest.raises(CorruptVersion, match=name):
            store.load_merge("m2")


def test_a_damaged_dense_merge_is_not_folded_into_but_rebuilt_from_its_tasks(store: AdapterStore) -> None:
    """A dense merge is derived data too: the next publish does not fold into the damaged one (it
    would build on garbage) and does not fail either (every later task would); it rebuilds the
    merge from the tasks' own verified files, the same merge a fold into an intact one gives."""
    store.publish("alpha", make_adapter(0), META, "magnitude")
    truncate(store.root / "merges/m1/delta.safetensors")
    with pytest.raises(
        CorruptVersion, match=r"delta\.safetensors .* truncated or changed.*next task's publish"
    ):
        store.load_merge("m1")
    published = store.publish("beta", make_adapter(1), META, "magnitude")
    assert published.merge.parents == ("alpha/v1", "beta/v1")
    store.verify(store.live(), *store.tasks())
    rebuilt = DenseDelta.load(published.merge.path)
    expected = build_merge("magnitude", [make_adapter(0), make_adapter(1)])
    assert isinstance(expected, DenseDelta)
    assert rebuilt.deltas.keys() == expected.deltas.keys()
    for module, delta in expected.deltas.items():
        torch.testing.assert_close(rebuilt.deltas[module], delta)


def test_a_version_of_another_base_model_is_refused(store: AdapterStore) -> None:
    store.publish("alpha", make_adapter(0), META, "concat")
    meta_path = store.root / "tasks/alpha/v1/meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "base_fingerprint": "f" * 16}))
    with pytest.raises(FingerprintMismatch, match=f"task alpha/v1 was written for base model {'f' * 16}"):
        store.verify(*store.tasks())


@pytest.mark.parametrize("where", ["tasks/alpha/v1/meta.json", "merges/m1/meta.json"])
def test_a_meta_that_is_not_json_is_a_damaged_version(store: AdapterStore, where: str) -> None:
    store.publish("alpha", make_adapter(0), META, "concat")
    truncate(store.root / where)
    with pytest.raises(CorruptVersion, match="meta.json is not JSON"):
        store.snapshot()
    with pytest.raises(CorruptVersion):
        store.publish("beta", make_adapter(1), META, "concat")
    assert len(store.ledger()) == 2


def test_rollback_to_a_damaged_merge_is_refused(store: AdapterStore) -> None:
    store.publish("alpha", make_adapter(0), META, "concat")
    store.publish("beta", make_adapter(1), META, "concat")
    flip(store.root / "merges/m1/adapter_model.safetensors")
    ledger = store.ledger()
    with pytest.raises(CorruptVersion, match="merge m1: adapter_model.safetensors"):
        store.rollback("m1")
    assert store.ledger() == ledger
    store.remove_task("alpha")  # the tasks themselves are intact: rebuilding works
    rolled = store.rollback("m3")
    assert store.ledger()[-1]["files"] == rolled.files  # a rollback's set_live carries them too


def test_an_old_ledger_without_checksums_still_loads(
    store: AdapterStore, caplog: pytest.LogCaptureFixture
) -> None:
    store.publish("alpha", make_adapter(0), META, "concat")
    path = store.root / "ledger.jsonl"
    old = [
        {k: v for k, v in json.loads(line).items() if k != "files"} for line in path.read_text().splitlines()
    ]
    path.write_text("".join(json.dumps(e) + "\n" for e in old))

    with caplog.at_level(logging.WARNING, logger="adapters_store.integrity"):
        assert len(store.history()) == 1 and store.load_merge("m1") is not None
        store.history()
    unverified = [r for r in caplog.records if "no recorded checksums" in r.getMessage()]
    assert [r.getMessage().split(" has")[0] for r in unverified] == ["task alpha/v1", "merge m1"]
    assert store.publish("beta", make_adapter(1), META, "concat").task.files is not None


# --- the fence -------------------------------------------------------------------------


class Fence:
    """Holds for the first ``holds_for`` checks, then lapses."""

    def __init__(self, token: int, holds_for: int) -> None:
        self.token, self.left, self.checks = token, holds_for, 0

    def holds(self) -> bool:
        self.checks += 1
        self.left -= 1
        return self.left >= 0


@pytest.mark.parametrize("holds_for", [0, 1])  # lapsed before the publish / during its writes
def test_a_lapsed_fence_refuses_the_publish_and_leaves_nothing(store: AdapterStore, holds_for: int) -> None:
    store.publish("alpha", make_adapter(0), META, "concat")
    ledger, files = store.ledger(), visible_versions(store.root)
    fence = Fence(7, holds_for)
    with pytest.raises(FenceLost, match="generation 7"):
        store.publish("beta", make_adapter(1), META, "concat", fence=fence)
    assert fence.checks == holds_for + 1
    assert store.ledger() == ledger and visible_versions(store.root) == files


def test_a_held_fence_publishes_and_records_its_token(store: AdapterStore) -> None:
    fence = Fence(3, holds_for=2)
    store.publish("alpha", make_adapter(0), META, "concat", fence=fence)
    assert fence.checks == 2  # once before the work, once just before the ledger append
    assert store.ledger()[0]["op"] == "add_task" and store.ledger()[0]["fence"] == 3


# --- disk full -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull }) (os error 28)"),
    ],
)
@pytest.mark.parametrize("at", ["tasks", "merges"])  # the task's files / the merge's files
def test_a_full_disk_fails_the_publish_cleanly_and_the_next_one_succeeds(
    store: AdapterStore, monkeypatch: pytest.MonkeyPatch, error: Exception, at: str
) -> None:
    store.publish("alpha", make_adapter(0), META, "concat")
    ledger, files = store.ledger(), visible_versions(store.root)
    real_save = lora_module.save_file

    def full_disk(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        if f"/{at}/" in filename:
            Path(filename).write_bytes(b"\0" * 16)  # the part that fitted
            raise error
        real_save(tensors, filename, metadata)

    monkeypatch.setattr(lora_module, "save_file", full_disk)
    with pytest.raises(DiskFull, match="disk is full") as refused:
        store.publish("beta", make_adapter(1), META, "concat")
    assert refused.value.code == "disk_full" and refused.value.errno == errno.ENOSPC
    assert store.ledger() == ledger and visible_versions(store.root) == files
    assert not list(store.root.rglob(".tmp-*"))

    monkeypatch.undo()  # space is back
    assert store.publish("beta", make_adapter(1), META, "concat").task.id == "beta/v1"
    assert [t.name for t in store.tasks()] == ["alpha", "beta"]


def test_a_full_disk_at_the_ledger_append_leaves_no_line(
    store: AdapterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.publish("alpha", make_adapter(0), META, "concat")
    ledger, files = store.ledger(), visible_versions(store.root)
    real_write = ledger_module.os.write

    def full(fd: int, data: bytes) -> int:
        real_write(fd, bytes(data)[:10])  # a torn line, then no space
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ledger_module.os, "write", full)
    with pytest.raises(DiskFull):
        store.publish("beta", make_adapter(1), META, "concat")
    monkeypatch.undo()
    assert store.ledger() == ledger and visible_versions(store.root) == files
    assert (store.root / "ledger.jsonl").read_bytes().endswith(b"\n")


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs (needs root and mount rights: skipped elsewhere)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_really_full_tmpfs_fails_the_publish_cleanly(small_tmpfs: Path) -> None:
    store = AdapterStore(small_tmpfs / "store", FP)
    store.publish("alpha", make_adapter(0), META, "concat")
    ledger = store.ledger()
    ballast = small_tmpfs / "ballast"
    with ballast.open("wb", buffering=0) as handle:  # fill the disk to the last block
        with pytest.raises(OSError) as full:
            while True:
                handle.write(b"\0" * 4096)
        assert full.value.errno == errno.ENOSPC
    with pytest.raises(DiskFull):
        store.publish("beta", make_adapter(1), META, "concat")
    assert store.ledger() == ledger and [t.name for t in store.tasks()] == ["alpha"]
    assert not (store.root / "tasks/beta/v1").exists() and not list(store.root.rglob(".tmp-*"))

    ballast.unlink()  # space is back
    assert store.publish("beta", make_adapter(1), META, "concat").merge.parents == ("alpha/v1", "beta/v1")


def test_a_publish_trained_on_tasks_no_longer_live_is_refused_and_writes_nothing(store: AdapterStore) -> None:
    from adapters_store.errors import LiveChanged

    store.publish("alpha", make_adapter(0), META, "concat")
    store.publish("beta", make_adapter(1), META, "concat")
    trained_on = tuple(t.id for t in store.tasks())
    store.rollback("m1")  # an admin, while gamma trained
    ledger, files = store.ledger(), visible_versions(store.root)
    with pytest.raises(LiveChanged, match="alpha/v1"):
        store.publish("gamma", make_adapter(2), META, "concat", trained_on=trained_on)
    assert store.ledger() == ledger and visible_versions(store.root) == files
    store.publish(
        "gamma", make_adapter(2), META, "concat", trained_on=("alpha/v1",)
    )  # trained on what is live
