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

Before the first task, :func:`base_subspace` protects what the base model already knows the same
way: its inputs on text it samples itself (no corpus to download, and the model's own
distribution is what "general ability" means for it) seed U at ``subspace_base_energy``. Without
the seed a first task of topic labels answered every probe question with a label (SmolLM2-135M:
the general-ability probe fell from 100 % to 0 % after one task; with the seed it kept 94 %).

Cost: the pass runs after every task, so it is kept to one forward pass and one
eigendecomposition per *distinct module input* (q/k/v share one, gate/up another:
:mod:`trainer.activations` finds them by tensor identity), on the task's token rows while they
are fewer than d_in (an n × n problem) and in span(U)'s complement once U is large
(:mod:`trainer.methods.subspace_algebra`). Memory: the covariances are d_in × d_in per input,
measured in groups that fit a budget; the embedded model and SmolLM2-135M need one pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapters_store.subspace import Subspace
from trainer.activations import InputMoment, input_moments
from trainer.config import TrainingExample
from trainer.loop import forward_batches, tokenize
from trainer.methods.subspace_algebra import grow_basis, grow_basis_from_rows
from trainer.served import merged_into

BASE_SAMPLES = 64  # sequences the base model samples to seed the subspace
BASE_SAMPLE_TOKENS = 64  # tokens each
BASE_SAMPLE_SEED = 0  # the samples, hence the seed subspace, are the same for every store


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
            moments = input_moments(model, batches, names)
    finally:
        model.train(was_training)
    bases = grow_bases(moments, previous.bases if previous is not None else {}, energy)
    # An unstored seed (base_subspace) is not a parent: its columns are stored with this basis.
    parent = previous if previous is not None and previous.merge_id is not None else None
    return Subspace(bases=bases, energy=energy, grown_from=parent)


def target_names(model: nn.Module, target_modules: Sequence[str]) -> list[str]:
    """Paths of the Linear layers a LoRA on ``target_modules`` (short names, as PEFT) adapts."""
    wanted = set(target_modules)
    return sorted(
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in wanted
    )


def base_subspace(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    names: Sequence[str],
    served: dict[str, torch.Tensor],
    energy: float,
    min_free: int,
) -> Subspace:
    """The input directions that hold ``energy`` of the served model's inputs on text it samples
    itself, per module in ``names``, leaving at least ``min_free`` directions free in each.

    Sampling (temperature 1, nucleus 0.95, from the BOS token, a fixed seed) draws from the model's own
    distribution, so the seed stands for what it does on ordinary text, not for any one task.
    """
    was_training = model.training
    model.eval()
    try:
        with merged_into(model, served):
            sequences = sample_from_bos(model, tokenizer, BASE_SAMPLES, BASE_SAMPLE_TOKENS, BASE_SAMPLE_SEED)
            mask = _through_first_eos(sequences, tokenizer.eos_token_id)
            batches = [(sequences[i : i + 16], mask[i : i + 16]) for i in range(0, len(sequences), 16)]
            moments = input_moments(model, batches, names)
    finally:
        model.train(was_training)
    bases = {}
    for name, U in grow_bases(moments, {}, energy).items():  # (d_in, k), columns by energy
        bases[name] = U[:, : max(U.shape[0] - min_free, 0)]
    return Subspace(bases=bases, energy=energy)


@torch.no_grad()
def sample_from_bos(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, n: int, max_new_tokens: int, seed: int | None
) -> torch.Tensor:
    """``n`` sequences the model samples from its BOS token (temperature 1, nucleus 0.95): its own
    notion of ordinary text. (n, 1 + new). With a ``seed`` the caller's RNG state is left as it
    was; None draws from the current state (a caller that seeded it for draws of its own)."""
    device = next(model.parameters()).device
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    start = torch.full((n, 1), start_id, device=device)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return model.generate(  # type: ignore[operator, no-any-return]
            start,
            attention_mask=torch.ones_like(start),
            do_sample=True,
            temperature=1.0,
            top_p=0.95,
            top_k=0,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.eos_token_id,
        )


def grow_bases(
    moments: dict[str, InputMoment], previous: dict[str, torch.Tensor], energy: float
) -> dict[str, torch.Tensor]:
    """Each module's basis ``previous[name]`` (None: empty) grown by its input's moment (GPM).

    Modules that share an input (one :class:`InputMoment` object) and hold equal bases get one
    growth between them, computed once; each gets its own copy of the result. A moment held as
    token rows (fewer tokens than d_in) is decomposed through its n × n Gram matrix.
    """
    done: list[tuple[InputMoment, torch.Tensor | None, torch.Tensor]] = []
    bases = {}
    for name, moment in moments.items():
        U = previous.get(name)
        grown = next((g for m, V, g in done if m is moment and _same_basis(U, V)), None)
        if grown is None:
            moment.finish()
            if moment.rows is not None:
                grown = grow_basis_from_rows(U, moment.rows, energy)
            else:
                grown = grow_basis(U, moment.covariance_matrix(), energy)
            done.append((moment, U, grown))
        bases[name] = grown.clone()
    return bases


def _same_basis(U: torch.Tensor | None, V: torch.Tensor | None) -> bool:
    if U is None or V is None:
        return U is V
    return U is V or torch.equal(U, V)


def _through_first_eos(sequences: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """Attention mask (b, T) of each sampled sequence up to and including its first EOS after
    the start token (what follows is padding that generate appended)."""
    mask = torch.ones_like(sequences)
    if eos_id is None:
        return mask
    is_eos = (sequences[:, 1:] == eos_id).long()  # (b, T-1)
    mask[:, 1:] = (is_eos.cumsum(dim=1) - is_eos == 0).long()  # no EOS strictly before
    return mask
