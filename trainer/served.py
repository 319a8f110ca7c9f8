"""The served model in a transformers process: base weights plus what a merge adds.

vLLM serves ``continual`` as W0 + ΔW (a LoRA on top of W0, or ΔW written into the weights).
The trainer needs the same model in fp32 to measure what the served model does — the
benchmark scores it, and ``inflora`` records the input subspace the live tasks occupy in it —
so both add ΔW to the base model's Linear weights for the duration of a block and put W0
back bit for bit afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedModel

from adapters_store.merges import DenseDelta, MergeResult


def merge_deltas(merge: MergeResult | None) -> dict[str, torch.Tensor]:
    """ΔW per target module of a merge (LoRA: scale · B @ A; dense: as stored)."""
    if merge is None:
        return {}
    if isinstance(merge, DenseDelta):
        return dict(merge.deltas)
    return merge.deltas()


@contextmanager
def merged_into(model: PreTrainedModel, deltas: dict[str, torch.Tensor]) -> Iterator[PreTrainedModel]:
    """Add each ΔW to its Linear's weight (fp32) for the duration of the block, then put the
    saved W0 back bit for bit — even if the block fails — so the next user starts clean."""
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, delta in deltas.items():
                weight = linear_weight(model, name)  # (d_out, d_in)
                if weight.shape != delta.shape:
                    raise ValueError(
                        f"ΔW of {name} is {tuple(delta.shape)}, the weight {tuple(weight.shape)}"
                    )
                saved[name] = weight.detach().clone()
                weight.add_(delta.to(device=weight.device, dtype=weight.dtype))
        yield model
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                linear_weight(model, name).copy_(original)


def linear_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The weight of the target Linear ``name``; anything else cannot take a ΔW = B @ A."""
    module = model.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{name} is a {type(module).__name__}, not the nn.Linear a LoRA adapter targets")
    return module.weight
