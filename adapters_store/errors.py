"""The store's refusals, in one module so that the store, its integrity checks and its callers
(the worker, the admin API) name the same types without importing each other."""

from __future__ import annotations

import errno


class StoreError(Exception):
    """Base class of the store's refusals."""


class InvalidTaskName(StoreError, ValueError):
    """Task names must match ``[a-z0-9][a-z0-9_-]{0,63}``."""


class TaskExists(StoreError):
    """A live task already has this name (remove it first)."""


class TaskNotFound(StoreError, LookupError):
    """No live task has this name."""


class MergeNotFound(StoreError, LookupError):
    """No merge version with this id was ever made live."""


class FingerprintMismatch(StoreError):
    """The store (or an adapter's meta) belongs to a different base model."""


class CorruptVersion(StoreError):
    """A version's files are not the ones its ledger entry recorded (truncated, changed, missing):
    it must not be loaded, served or built upon."""


class FenceLost(StoreError):
    """The publisher no longer holds the claim it was publishing under (its lease lapsed and the
    job board gave the job up): the store refused the publish and wrote nothing.

    ``rolled_back``: the claim was checked in the ledger append's database transaction, so what
    the job board recorded then (the job failing) was rolled back with it and must be asked again."""

    rolled_back: bool = False


class LiveChanged(StoreError):
    """The live tasks changed (an admin rollback, removal or import) after the task being
    published began training on them: publishing it would build on a model that is no longer
    live (an earlier task left unprotected, ``as_learned`` unlike what was trained)."""


class DiskFull(StoreError, OSError):
    """The store's disk ran out of space (or quota) while writing; nothing was published."""

    code = "disk_full"


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC/EDQUOT as an OSError, or as the message of a library that wraps it (safetensors
    reports a failed write as ``... (os error 28)``)."""
    if isinstance(error, OSError) and error.errno in NO_SPACE:
        return True
    text = str(error)
    return any(f"os error {code})" in text for code in NO_SPACE) or "No space left on device" in text


def raise_if_disk_full(error: BaseException, doing: str) -> None:
    """Re-raise a write that failed for lack of space as :class:`DiskFull`; else return."""
    if is_disk_full(error) and not isinstance(error, DiskFull):
        raise DiskFull(
            errno.ENOSPC,
            f"the store's disk is full ({error}) while {doing}; nothing was written. "
            "Free space in the store's directory and try again.",
        ) from error
