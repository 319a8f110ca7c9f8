"""Input second moments of a model's linear layers: what inflora measures to place its frozen A.

C = Σ x xᵀ over every real (non-padding) token that reaches a module, from forward pre-hooks, so
one forward pass over a task's sequences gives every module's C. Three things keep the pass cheap
(it runs after every inflora task, so it is part of what a task costs):

- Modules that read the *same input tensor* (a Llama's q/k/v read one normalized hidden state,
  gate/up another) share one moment, found by tensor identity in the hooks: one accumulation per
  distinct input, and the result maps each of those names to the same object, so the
  eigendecomposition downstream can run once per input too.
- While a module has seen fewer real tokens than d_in, the tokens themselves X (n, d_in) are kept
  instead of C = XᵀX: smaller, and C's eigenvectors then come from the n × n Gram matrix
  (:func:`trainer.methods.subspace_algebra.grow_basis_from_rows`). A task of a few hundred tokens
  never forms a d_in × d_in matrix; past d_in tokens the rows fold into C (fp64).
- Only the last position's logits are computed (``logits_to_keep=1``): the output layer over every
  position is a large share of a small model's forward pass and no target module reads it.

Covariances are d_in × d_in each: modules are measured in groups whose moments fit
``memory_bytes`` (one pass per group), so a large model costs passes, not memory.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

COVARIANCE_MEMORY_BYTES = 1 << 30  # covariances held at once while measuring (fp64)


@dataclass
class InputMoment:
    """Σ x xᵀ of one module input: the token rows while fewer than d_in, else the covariance.

    Exactly one of ``rows`` (n, d_in) fp32 and ``covariance`` (d_in, d_in) fp64 is set once a
    token has been added; :meth:`covariance_matrix` gives C either way.
    """

    d_in: int
    rows: torch.Tensor | None = None
    covariance: torch.Tensor | None = None
    _pending: list[torch.Tensor] = field(default_factory=list, repr=False)

    def add(self, tokens: torch.Tensor) -> None:
        """Add the real tokens (n, d_in) of one batch."""
        tokens = tokens.detach().float()
        if self.covariance is not None:
            self.covariance += (tokens.T @ tokens).double()  # (d_in, d_in)
            return
        self._pending.append(tokens)
        if sum(len(t) for t in self._pending) + (0 if self.rows is None else len(self.rows)) >= self.d_in:
            X = self._gathered()  # (n ≥ d_in, d_in)
            self.rows, self._pending = None, []
            self.covariance = (X.T @ X).double()

    def finish(self) -> InputMoment:
        """Concatenate the rows collected batch by batch (once, after the pass)."""
        if self._pending:
            self.rows, self._pending = self._gathered(), []
        return self

    def covariance_matrix(self) -> torch.Tensor:
        """C = Σ x xᵀ (d_in, d_in), fp64."""
        self.finish()
        if self.covariance is not None:
            return self.covariance
        if self.rows is None:
            raise ValueError("no tokens were added")
        return (self.rows.T @ self.rows).double()

    @property
    def tokens(self) -> int:
        return 0 if self.rows is None else len(self.rows)

    def _gathered(self) -> torch.Tensor:
        parts = ([] if self.rows is None else [self.rows]) + self._pending
        return torch.cat(parts)  # (n, d_in)


def input_moments(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    names: Sequence[str],
    memory_bytes: int = COVARIANCE_MEMORY_BYTES,
) -> dict[str, InputMoment]:
    """Σ x xᵀ over every non-padding token of ``batches`` (input_ids, attention_mask), per module.

    Modules that read one input tensor get the same :class:`InputMoment` object. Each group of
    modules whose fp64 covariances fit ``memory_bytes`` costs one pass.
    """
    moments: dict[str, InputMoment] = {}
    for group in _groups(model, names, memory_bytes):
        moments.update(_group_moments(model, batches, group))
    return moments


def input_covariances(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    names: Sequence[str],
    memory_bytes: int = COVARIANCE_MEMORY_BYTES,
) -> dict[str, torch.Tensor]:
    """:func:`input_moments` as covariance matrices (d_in, d_in) fp64; names sharing an input
    share one tensor."""
    moments = input_moments(model, batches, names, memory_bytes)
    matrices: dict[int, torch.Tensor] = {}
    return {
        name: matrices.setdefault(id(moment), moment.covariance_matrix()) for name, moment in moments.items()
    }


@torch.no_grad()
def _group_moments(
    model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], group: list[str]
) -> dict[str, InputMoment]:
    """One forward pass over ``batches`` with a pre-hook on each module of ``group``.

    The first module of a batch to see an input tensor accumulates it; a later module handed the
    very same tensor (``is``, held by weak reference so no activation outlives its use) only
    notes whose moment it shares. The sharing must be the same in every batch.
    """
    moments: dict[str, InputMoment] = {}
    owner: dict[str, str] = {}  # module -> the module whose moment it shares (itself if none)
    seen: list[tuple[weakref.ref[torch.Tensor], str]] = []  # this batch's distinct inputs
    real_tokens: list[torch.Tensor] = []  # the current batch's attention mask, as bool (b, T)

    def accumulate(name: str, x: torch.Tensor) -> None:
        first = next((first for ref, first in seen if ref() is x), None)
        if owner.setdefault(name, first or name) != (first or name):
            raise RuntimeError(f"{name} shared its input with {owner[name]} in one batch but not in another")
        if first is not None:
            return
        seen.append((weakref.ref(x), name))
        moment = moments.setdefault(name, InputMoment(d_in=x.shape[-1]))
        moment.add(x[real_tokens[-1]])  # (n, d_in): real tokens only

    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda _module, args, name=name: accumulate(name, args[0])
        )
        for name in group
    ]
    try:
        for input_ids, attention_mask in batches:
            real_tokens.append(attention_mask.bool())
            seen.clear()
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in group if name not in owner]
    if missing:
        raise ValueError(f"modules {missing} saw no input; are they used by the model's forward pass?")
    return {name: moments[owner[name]].finish() for name in group}


def _groups(model: nn.Module, names: Sequence[str], memory_bytes: int) -> list[list[str]]:
    """Consecutive modules whose d_in² fp64 covariances fit the budget (at least one each).

    Counted per module, an upper bound: modules that share an input hold one moment between them.
    """
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
