"""``inflora``'s protected input subspace: measured on the served model, grown per task (GPM).

For a target module with input x, a task's update changes the module's output by
ΔW_t x = s · B_t (A_t x). If every row of the frozen A_t is orthogonal to the inputs the
earlier tasks produce, A_t x_old = 0 and the earlier answers cannot move, whatever B_t learns
(and, layer by layer, the earlier tasks' inputs to later layers stay what they were).

After a task is trained, :func:`grow_subspace` runs the model *as it will be served* (base +
every live ΔW + the new one) over the task's training sequences, accumulates each module's
input covariance C = Σ x xᵀ over every real token, and extends the module's basis U the way
GPM does (Saha et al. 2021, eq. 8–9): the energy the basis already holds is tr(Uᵀ C U); the
residual covariance (I − UUᵀ) C (I − UUᵀ) contributes its top eigenvectors until the basis
holds a fraction ε of tr(C). So for every protected task, ‖U Uᵀ X‖²_F ≥ ε ‖X‖²_F.

Memory: the covariances are d_in × d_in per module. Modules are measured in groups whose
covariances fit ``memory_bytes`` (one forward pass over the task's sequences per group), so a
large model costs extra passes, not memory; the embedded model and SmolLM2-135M need one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapters_store.subspace import Subspace, orthonormalize
from trainer.config import TrainingExample
from trainer.loop import padded_batch, tokenize
from trainer.served import merged_into

COVARIANCE_MEMORY_BYTES = 1 << 30  # covariances held at once while measuring (fp64)
BATCH_SIZE = 16


def grow_basis(U: torch.Tensor | None, C: torch.Tensor, energy: float) -> torch.Tensor:
    """Extend the orthonormal basis U (d_in, k) so that it holds ``energy`` of tr(C) (GPM).

    C is one task's input covariance (d_in, d_in). Directions are added in order of the
    residual covariance's eigenvalues; none when U already holds enough.
    """
    d_in = C.shape[0]
    C = C.double()
    U = C.new_zeros(d_in, 0) if U is None else U.double()
    total = float(torch.trace(C))
    if total <= 0:
        return U.float()
    CU = C @ U  # (d_in, k)
    held = float((U * CU).sum())  # tr(Uᵀ C U)
    needed = energy * total - held
    if needed <= 0 or U.shape[1] == d_in:
        return U.float()
    # (I − UUᵀ) C (I − UUᵀ) without forming I − UUᵀ:
    UtCU = U.T @ CU  # (k, k)
    residual = C - U @ CU.T - CU @ U.T + U @ UtCU @ U.T  # (d_in, d_in)
    values, vectors = torch.linalg.eigh((residual + residual.T) / 2)  # ascending
    values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
    count = int(torch.searchsorted(values.cumsum(0), torch.tensor(needed, dtype=values.dtype))) + 1
    count = min(count, d_in - U.shape[1])
    fresh = vectors[:, :count]  # (d_in, m)
    fresh = fresh - U @ (U.T @ fresh)  # re-orthogonalize against U (eigh's round-off)
    return orthonormalize(torch.cat([U, fresh], dim=1)).float()


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


def grow_subspace(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[TrainingExample],
    served: dict[str, torch.Tensor],
    previous: Subspace | None,
    energy: float,
    max_seq_len: int,
) -> Subspace:
    """The protected subspace after a task: ``previous`` grown by the task's inputs to every
    module of ``served`` (ΔW per module of the merge that will be live), measured on W0 + ΔW."""
    device = next(model.parameters()).device
    encoded = tokenize(tokenizer, examples, max_seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = [
        padded_batch(encoded[start : start + BATCH_SIZE], pad_id, device)[:2]
        for start in range(0, len(encoded), BATCH_SIZE)
    ]
    names = sorted(served)
    was_training = model.training
    model.eval()
    try:
        with merged_into(model, served):
            covariances = input_covariances(model, batches, names)
    finally:
        model.train(was_training)
    old = previous.bases if previous is not None else {}
    bases = {name: grow_basis(old.get(name), covariances.pop(name), energy) for name in names}
    return Subspace(bases=bases, energy=energy)
