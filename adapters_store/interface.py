"""The store's interfaces: what the server and the trainer type against, and the fence a
publisher hands the store. Kept apart so that neither side needs the local implementation."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from adapters_store.errors import FenceLost
from adapters_store.lora import LoraAdapter
from adapters_store.merges import MergeResult
from adapters_store.subspace import Subspace
from adapters_store.versions import MergeRecord, Publication, StoreSnapshot, TaskRecord

log = logging.getLogger("adapters_store.store")  # refusals log as the store


class Fence(Protocol):
    """A publisher's claim, checked by the store under its writer lock just before the ledger
    append (e.g. :class:`trainer.contract.board.ClaimFence`): ``holds()`` False refuses the publish."""

    @property
    def token(self) -> int:
        """The claim's generation, recorded with the task it published."""
        ...

    def holds(self) -> bool: ...


def check_fence(fence: Fence | None, name: str, connection: object | None = None) -> None:
    """Refuse (:class:`FenceLost`) a publish of ``name`` whose publisher's claim has lapsed; call
    under the store's writer lock, so the claim cannot lapse between this check and the write.

    ``connection`` is the database transaction that is about to append the ledger entries (the
    database ledger passes it): a fence with ``holds_in(connection)`` (a claim on a job board in the
    same database) checks and renews the claim in that transaction, so the claim and the publish
    commit together or not at all."""
    if fence is None:
        return
    holds_in = getattr(fence, "holds_in", None)
    in_transaction = connection is not None and holds_in is not None
    held = holds_in(connection) if in_transaction and holds_in is not None else fence.holds()
    if not held:
        log.warning("refusing to publish %s: the publisher's claim (generation %d) lapsed", name, fence.token)
        error = FenceLost(
            f"the claim (generation {fence.token}) under which {name!r} was trained has lapsed; "
            "the store refused the publish and wrote nothing"
        )
        error.rolled_back = in_transaction
        raise error


class Store(Protocol):
    """The store interface the server and the trainer use."""

    fingerprint: str

    def publish(
        self,
        name: str,
        adapter: LoraAdapter,
        meta: dict[str, Any],
        merge: str,
        weights: list[float] | None = None,
        notes: list[dict[str, Any]] | None = None,
        subspace: Subspace | None = None,
        as_learned: bool = False,
        fence: Fence | None = None,
        trained_on: tuple[str, ...] | None = None,
        own_model: LoraAdapter | None = None,
    ) -> Publication: ...
    def snapshot(self) -> StoreSnapshot: ...
    def tasks(self) -> list[TaskRecord]: ...
    def task_adapter(self, name: str) -> LoraAdapter: ...
    def history(self) -> list[LoraAdapter]: ...
    def live(self) -> MergeRecord | None: ...
    def subspace(self) -> Subspace | None: ...
    def merge(self, merge_id: str) -> MergeRecord: ...
    def load_merge(self, merge_id: str) -> MergeResult: ...
    def ledger(self) -> list[dict[str, Any]]: ...
    def verify(self, *records: TaskRecord | MergeRecord | None) -> None: ...
    def rollback(self, merge_id: str, notes: list[dict[str, Any]] | None = None) -> MergeRecord: ...
    def remove_task(self, name: str, notes: list[dict[str, Any]] | None = None) -> MergeRecord | None: ...
