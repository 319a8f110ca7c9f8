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

Memory: the covariances are d_in × d_in per module, measured in groups that fit a budget
(:mod:`trainer.activations`); the embedded model and SmolLM2-135M need one pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapters_store.subspace import Subspace
from trainer.activations import input_covariances
from trainer.config import TrainingExample
from trainer.loop import forward_batches, tokenize
from trainer.methods.input_subspace import grow_basis
from trainer.served import merged_into


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
    batches = forward_batches(tokenizer, tokenize(tokenizer, examples, max_seq_len), device)
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
    return Subspace(bases=bases, energy=energy, grown_from=previous)
