"""Why a task cannot join a store. The trainer says *why* (a reason); the server decides what
HTTP status that is (``server/training/service.py``), so no trainer code speaks HTTP."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

IMPORTED = "import"
"""The method recorded for an adapter imported through ``POST /admin/adapters``: it joins the live
merge and never sets the store's method (:func:`trainer.admission.admit`)."""


class AdmissionReason(StrEnum):
    """A refusal's reason; also the ``code`` users see in the error body and on a failed job."""

    invalid_name = "invalid_name"
    task_exists = "task_exists"
    method_mismatch = "method_mismatch"
    rank_exceeded = "rank_exceeded"
    capacity_exceeded = "capacity_exceeded"


@dataclass
class AdmissionError(Exception):
    """Why a task cannot be trained into this store, with the field to blame."""

    reason: AdmissionReason
    message: str
    param: str

    @property
    def code(self) -> str:
        return self.reason.value

    def __str__(self) -> str:
        return self.message


def check_concat_rank(live_ranks: Iterable[int], rank: int, max_lora_rank: int, param: str, fix: str) -> None:
    """The one concat rank check, for a trained task and an imported adapter alike: a concat
    merge's rank is the sum of its tasks' ranks, and the engine serves a LoRA of at most
    ``max_lora_rank``. ``fix`` tells the user what to change (it differs between the two)."""
    total = sum(live_ranks) + rank
    if total > max_lora_rank:
        raise AdmissionError(
            AdmissionReason.rank_exceeded,
            f"the continual concat merge would have rank {total}, above the server's max_lora_rank "
            f"{max_lora_rank}. {fix}",
            param,
        )
