"""Input covariances of a model's linear layers: what inflora measures to place its frozen A.

C = Σ x xᵀ over every real (non-padding) token that reaches a module, accumulated in fp64 from
forward pre-hooks, so one forward pass over a task's sequences gives every module's C.
Covariances are d_in × d_in each: modules are measured in groups whose covariances fit
``memory_bytes`` (one pass per group), so a large model costs passes, not memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

COVARIANCE_MEMORY_BYTES = 1 << 30  # covariances held at once while measuring (fp64)


def input_covariances(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    names: Sequence[str],
    memory_bytes: int = COVARIANCE_MEMORY_BYTES,
) -> dict[str, torch.Tensor]:
    """Σ x xᵀ over every non-padding token of ``batches`` (input_ids, attention_mask), per module.

    Each group of modules whose fp64 covariances fit ``memory_bytes`` costs one pass.
    """
    covariances: dict[str, torch.Tensor] = {}
    for group in _groups(model, names, memory_bytes):
        covariances.update(_group_covariances(model, batches, group))
    return covariances


@torch.no_grad()
def _group_covariances(
    model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], group: list[str]
) -> dict[str, torch.Tensor]:
    """One forward pass over ``batches`` with a pre-hook on each module of ``group``."""
    sums: dict[str, torch.Tensor] = {}
    real_tokens: list[torch.Tensor] = []  # the current batch's attention mask, as bool (b, T)

    def accumulate(name: str, x: torch.Tensor) -> None:
        tokens = x[real_tokens[-1]].float()  # (n, d_in): real tokens only
        update = (tokens.T @ tokens).double()  # (d_in, d_in)
        sums[name] = sums[name] + update if name in sums else update

    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda _module, args, name=name: accumulate(name, args[0])
        )
        for name in group
    ]
    try:
        for input_ids, attention_mask in batches:
            real_tokens.append(attention_mask.bool())
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in group if name not in sums]
    if missing:
        raise ValueError(f"modules {missing} saw no input; are they used by the model's forward pass?")
    return sums


def _groups(model: nn.Module, names: Sequence[str], memory_bytes: int) -> list[list[str]]:
    """Consecutive modules whose d_in² fp64 covariances fit the budget (at least one each)."""
    groups: list[list[str]] = [[]]
    used = 0
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{name} is a {type(module).__name__}, not an nn.Linear")
        size = module.in_features**2 * 8
        if groups[-1] and used + size > memory_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return [group for group in groups if group]
