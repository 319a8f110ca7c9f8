"""Adapter files in object storage (``LAMINA_STORE=s3://bucket/prefix``), read through a local
copy of each version that every process keeps under its own store directory.

Why content addressing: the ledger entry that names a version already records the sha256 of
each of its files, so a file is uploaded once as ``<prefix>/blobs/<sha256>`` and never
overwritten, and a version needs no manifest of its own. A publish uploads its files *before*
it appends its ledger entries: until that commit no reader knows the digests, so a version whose
upload stopped half-way is never visible, only unreferenced objects are left.

Reading a version the ledger names downloads the files its local copy lacks into a hidden
sibling, checks each against the ledger's digest and renames the whole into place, so vLLM and
PEFT keep loading plain directories and a local copy is a whole version or absent. A local copy
that differs from the ledger (a crash left an unpublished version of the same number, a damaged
file) is replaced from the bucket.

Any fsspec filesystem works (``s3://`` through s3fs against AWS or any S3-compatible service,
``memory://``, ``file://``); ``options`` are passed to it (e.g. ``endpoint_url``).
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import fsspec

from adapters_store.errors import CorruptVersion, StoreError
from adapters_store.integrity import sha256_file, verify_tree

log = logging.getLogger(__name__)


class ObjectStorage:
    """The bucket (or prefix) at ``url`` that holds a store's files under their digests."""

    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url, **(options or {}))
        self.prefix = f"{root.rstrip('/')}/blobs"
        try:  # open the client's connection now, so the first version a server reads does not pay for it
            self.fs.exists(self.prefix)
        except Exception as error:
            log.warning(
                "object storage %s is not reachable yet (%s); retrying at the first read", self.url, error
            )

    def _key(self, digest: str) -> str:
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise CorruptVersion(f"not a sha256 digest: {digest!r}")
        return f"{self.prefix}/{digest}"

    def upload(self, directory: Path, files: dict[str, str]) -> int:
        """Upload the files of a version written at ``directory`` (``relative -> sha256``) that
        the bucket lacks; returns how many were uploaded. Objects are immutable: one already
        there under its digest holds the same bytes."""
        uploaded = 0
        for relative, digest in files.items():
            key = self._key(digest)
            if self.fs.exists(key):
                continue
            self.fs.put_file(str(directory / relative), key)
            uploaded += 1
        return uploaded

    def fetch(self, directory: Path, files: dict[str, str], label: str) -> None:
        """Make ``directory`` the version the ledger recorded as ``files``: keep a local copy that
        matches, otherwise download it whole (verified) and put it in place in one rename."""
        if directory.is_dir():
            try:
                verify_tree(directory, files, label)
                return
            except CorruptVersion as error:
                log.warning("replacing the local copy of %s from %s: %s", label, self.url, error)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.with_name(f".fetch-{directory.name}-{uuid.uuid4().hex}")
        try:
            targets = {relative: tmp / relative for relative in files}
            for target in targets.values():
                target.parent.mkdir(parents=True, exist_ok=True)
            try:  # one call for all of them: s3fs downloads a list concurrently
                self.fs.get([self._key(d) for d in files.values()], [str(t) for t in targets.values()])
            except FileNotFoundError as error:
                raise StoreError(f"{label}: a file is missing from {self.url} ({error})") from None
            for relative, digest in files.items():
                if not targets[relative].is_file():
                    raise StoreError(
                        f"{label}: {relative} (sha256 {digest[:12]}…) is missing from {self.url}"
                    )
                if sha256_file(targets[relative]) != digest:
                    raise CorruptVersion(
                        f"{label}: {relative} in {self.url} does not match its recorded sha256"
                    )
            if directory.exists():  # an unpublished or damaged copy under the same name
                shutil.rmtree(directory)
            try:
                os.rename(tmp, directory)
            except OSError:
                if not directory.is_dir():  # another process of this host put it in place first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
