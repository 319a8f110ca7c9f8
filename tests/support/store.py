"""Small synthetic adapters and a look at a store's directories, for the store's tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from adapters_store.lora import LoraAdapter, LoraModule

FP = "0123456789abcdef"
SHAPES = {"model.layers.0.self_attn.q_proj": (12, 10), "model.layers.0.mlp.down_proj": (10, 16)}
META = {"method": "lori-s", "hyper_parameters": {"lr": 1e-3}, "data_hash": "abc", "metrics": {"loss": 0.1}}


def make_adapter(seed: int, rank: int = 2, density: float = 0.5) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    modules, masks = {}, {}
    for name, (d_out, d_in) in SHAPES.items():
        mask = torch.rand(d_out, rank, generator=g) < density
        B = torch.randn(d_out, rank, generator=g) * mask
        modules[name] = LoraModule(A=torch.randn(rank, d_in, generator=g), B=B, scale=2.0)
        masks[name] = mask
    return LoraAdapter(modules=modules, masks=masks)


def visible_versions(root: Path) -> list[str]:
    """Every version directory and leftover temporary one under the store."""
    found = [p for p in (root / "tasks").glob("*/*")] + list((root / "merges").glob("*"))
    return sorted(str(p.relative_to(root)) for p in found)


# The store's backends, as the tests name them: files in the store's directory (the default),
# the ledger in PostgreSQL, and the ledger in PostgreSQL with the files in object storage.
BACKENDS = ("file", "database", "object-storage")


def backend_options(kind: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """``AdapterStore`` keyword arguments for one store on the backend ``kind``; every store
    opened with the same options is the same store (two hosts', with two roots)."""
    if kind == "file":
        return {}
    from adapters_store.ledger_database import DatabaseLedger
    from tests.support.database import unique_store

    url = request.getfixturevalue("database_url")
    if kind == "database":
        location = unique_store()
        return {"ledger": DatabaseLedger(url, location), "location": location}
    from adapters_store.blobs import ObjectStorage

    s3 = request.getfixturevalue("s3")
    location = s3.store_url()
    return {
        "ledger": DatabaseLedger(url, location),
        "objects": ObjectStorage(location, s3.options),
        "location": location,
    }
