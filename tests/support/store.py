"""Small synthetic adapters and a look at a store's directories, for the store's tests."""

from __future__ import annotations

from pathlib import Path

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
