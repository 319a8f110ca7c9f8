"""How a task's ΔW = scale · B @ A is parametrized: ``lora``, ``lori``, ``loraf``, ``inflora`` and
``own-lora``.

Each class works on the live PEFT weights handed over by the loop (:class:`LoraParams`) and
returns the finished task as an :class:`~adapters_store.lora.LoraAdapter` in fp32.

Masks (LoRI-S, LoRAF) are enforced twice: a gradient hook zeroes the gradient outside the mask,
and after every optimizer step the entries outside the mask are put back to their frozen values.
The hook alone is not enough: AdamW's decoupled weight decay moves a nonzero entry whose gradient
is 0 (LoRAF's shared B holds the earlier tasks' entries).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from adapters_store.lora import LoraAdapter, LoraModule
from adapters_store.subspace import Subspace
from trainer.config import Hyperparameters, MethodSpec
from trainer.methods.capacity import loraf_mask_size
from trainer.methods.registry import Layers, LoraParams
from trainer.methods.subspace_algebra import leading_free_directions, off_subspace, project_rows

# Module i of a task gets the seed task_seed * stride + i (i in sorted module-name order), so
# no two (task, module) pairs share a seed for models with fewer than `stride` target modules.
MODULE_SEED_STRIDE = 100_003


class CapacityError(RuntimeError):
    """LoRAF: the shared B has fewer free positions than the new task's mask needs."""


# ---------------------------------------------------------------------------------------------
# Small pure functions (tested directly against reference computations).


def module_seed(task_seed: int, index: int) -> int:
    """Seed of the frozen A of the ``index``-th target module (sorted by name) of a task."""
    return task_seed * MODULE_SEED_STRIDE + index


def kaiming_uniform(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A seeded (r, d_in) matrix with entries U(−1/√d_in, 1/√d_in).

    This is Kaiming-uniform with a = √5, the initialisation PEFT and ``nn.Linear`` give ``lora_A``
    (LoRI §2.1: "Matrices A are usually initialized with Kaiming Uniform"). Drawn from a private
    generator so the same seed gives the same A on any machine, without touching global RNG.
    """
    rank, d_in = shape
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(d_in)
    return (torch.rand(rank, d_in, generator=generator, dtype=torch.float32) * 2 - 1) * bound  # (r, d_in)


def global_topk_masks(scores: dict[str, torch.Tensor], keep_fraction: float) -> dict[str, torch.Tensor]:
    """LoRI eq. 2: keep the global top-``keep_fraction`` entries of all |B| across every module.

    One model-wise threshold (the paper's quantile τ) rather than one per matrix, so modules that
    matter more get more of the budget. Uses an exact top-k over the concatenation, so exactly
    ``round(keep_fraction · N)`` entries are kept even when magnitudes tie.
    """
    names = sorted(scores)
    flat = torch.cat([scores[name].abs().flatten() for name in names])  # (N,)
    k = max(1, round(keep_fraction * flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.topk(flat, k).indices] = True
    masks: dict[str, torch.Tensor] = {}
    offset = 0
    for name in names:
        size = scores[name].numel()
        masks[name] = keep[offset : offset + size].view_as(scores[name])  # (d_out, r)
        offset += size
    return masks


def feasible_topk_mask(update: torch.Tensor, feasible: torch.Tensor, k: int) -> torch.Tensor:
    """LoRAF Algorithm 1 line 7: M_t = TopK(|B − B⁽⁰⁾|) restricted to the feasible set Ω."""
    scores = update.abs().masked_fill(~feasible, -1.0).flatten()  # (d_out·r,); infeasible below any |·|
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[torch.topk(scores, k).indices] = True
    return mask.view_as(update)  # (d_out, r)


def _same(U: torch.Tensor | None, V: torch.Tensor | None) -> bool:
    """The same basis (or both none): modules that may share one eigendecomposition."""
    if U is None or V is None:
        return U is V
    return U is V or torch.equal(U, V)


def _sorted(layers: Layers) -> Iterator[tuple[int, str, LoraParams]]:
    for index, name in enumerate(sorted(layers)):
        yield index, name, layers[name]


class _MaskedB:
    """Confines training of one B to ``mask``; entries outside stay equal to ``frozen``."""

    def __init__(self, B: nn.Parameter, mask: torch.Tensor, frozen: torch.Tensor) -> None:
        self.B, self.mask, self.frozen = B, mask.to(B.device), frozen.to(B.device)
        self._hook = B.register_hook(lambda grad: grad * self.mask)

    @torch.no_grad()
    def restore(self) -> None:
        self.B.copy_(torch.where(self.mask, self.B, self.frozen))

    def close(self) -> None:
        self._hook.remove()


class _Base:
    """Shared plumbing: no calibration, no masks, export A and B as they are."""

    calibration_steps = 0
    protects_inputs = False  # True: publishing must record the task's input subspace (inflora)

    def __init__(
        self,
        hp: Hyperparameters,
        method: MethodSpec,
        history: list[LoraAdapter],
        subspace: Subspace | None = None,
    ) -> None:
        self.hp, self.method, self.history, self.subspace = hp, method, history, subspace
        self.masked: dict[str, _MaskedB] = {}
        self._metrics: dict[str, float | int | str] = {}
        self._prepare()

    def _prepare(self) -> None:
        """Set up what a parametrization keeps beyond the shared fields (no model yet)."""

    def calibrate(self, layers: Layers) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no calibration phase")

    def after_step(self, layers: Layers) -> None:
        for masked in self.masked.values():
            masked.restore()

    def export(self, layers: Layers) -> LoraAdapter:
        modules = {
            name: LoraModule(
                A=p.A.detach().float().cpu().clone(), B=p.B.detach().float().cpu().clone(), scale=p.scale
            )
            for name, p in layers.items()
        }
        return LoraAdapter(modules=modules)

    def metrics(self) -> dict[str, float | int | str]:
        return dict(self._metrics)

    def close(self) -> None:
        for masked in self.masked.values():
            masked.close()
        self.masked.clear()

    def _mask(self, layers: Layers, masks: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor]) -> None:
        self.close()
        self.masked = {name: _MaskedB(layers[name].B, masks[name], frozen[name]) for name in layers}

    def _task_seed(self) -> int:
        """Different per task (its position in the store) so each task draws a fresh random A."""
        return self.hp.seed + len(self.history)

    @staticmethod
    def merge_part(adapter: LoraAdapter, subspace: Subspace | None) -> tuple[LoraAdapter, float | None]:
        """What the store's merge receives of a trained task, and the share of its update that
        is (None: all of it, as trained)."""
        return adapter, None


class Lora(_Base):
    """Plain LoRA (Hu et al. 2021, eq. 1 of LoRAF: h = W0 x + B A x): A and B both trained.

    A starts seeded Kaiming-uniform, B at zero, so ΔW = 0 at step 0 (IncLoRA, O-LoRA, N-LoRA,
    PS-LoRA all start each task this way). With ``warm_start`` (SeqLoRA) A and B start from the
    previous task's adapter instead and simply keep training.
    """

    @torch.no_grad()
    def setup(self, layers: Layers) -> None:
        seed = self._task_seed()
        previous = self.history[-1] if self.method.warm_start and self.history else None
        for index, name, p in _sorted(layers):
            if previous is not None:
                old = previous.modules.get(name)
                if old is None or old.A.shape != p.A.shape or old.B.shape != p.B.shape:
                    raise ValueError(f"{self.method.name}: the previous adapter does not match module {name}")
                if not math.isclose(old.scale, p.scale):
                    raise ValueError(
                        f"{self.method.name}: previous scale {old.scale} ≠ {p.scale} (r, lora_alpha)"
                    )
                p.A.copy_(old.A)
                p.B.copy_(old.B)
            else:
                p.A.copy_(kaiming_uniform(p.A.shape, seed=module_seed(seed, index)))
                p.B.zero_()
        self._metrics["init_seed"] = seed
        self._metrics["warm_start"] = int(previous is not None)


class Lori(_Base):
    """LoRI (Zhang et al. 2025, §2.1): A frozen random projection, only B trained.

    With sparsity s > 0 (LoRI-S): ``calibration_steps`` of unmasked training, then the mask of
    eq. 2 — the global top-(1 − s) |B| over all modules — then B is reset to 0 and only the masked
    entries are trained. The adapter is ΔW = scale · (B ⊙ M) A. The seed of A is in the metrics
    (``a_seed``; module i uses :func:`module_seed`), so A can be regenerated rather than stored.
    """

    def _prepare(self) -> None:
        self.sparsity = self.method.effective_sparsity(self.hp)
        self.calibration_steps = self.hp.calibration_steps if self.sparsity > 0 else 0
        self.masks: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def setup(self, layers: Layers) -> None:
        seed = self._fresh_seed(layers)
        for index, name, p in _sorted(layers):
            p.A.copy_(self._frozen_A(name, kaiming_uniform(p.A.shape, seed=module_seed(seed, index))))
            p.A.requires_grad_(False)
            p.B.zero_()
        self._metrics.update(a_seed=seed, sparsity=self.sparsity)

    def _frozen_A(self, name: str, A: torch.Tensor) -> torch.Tensor:
        """The task's frozen A for module ``name``: LoRI's random projection as drawn."""
        return A

    @torch.no_grad()
    def calibrate(self, layers: Layers) -> None:
        self.masks = global_topk_masks(
            {name: p.B.detach().cpu() for name, p in layers.items()}, 1 - self.sparsity
        )
        for p in layers.values():
            p.B.zero_()
        self._mask(layers, self.masks, {name: torch.zeros_like(p.B) for name, p in layers.items()})
        kept = sum(int(m.sum()) for m in self.masks.values())
        self._metrics["mask_density"] = kept / sum(m.numel() for m in self.masks.values())

    def export(self, layers: Layers) -> LoraAdapter:
        adapter = super().export(layers)
        if self.masks:
            adapter.masks = {name: mask.clone() for name, mask in self.masks.items()}
        return adapter

    def _fresh_seed(self, layers: Layers) -> int:
        """The task seed, bumped past any seed whose A an earlier task already uses.

        Concat merging relies on the tasks' random A's being different (LoRI eq. 4, approximate
        orthogonality); a seed can repeat when tasks are removed and the store's length shrinks.
        """
        seed = self._task_seed()
        index, name, p = next(_sorted(layers))
        used = [h.modules[name].A for h in self.history if name in h.modules]
        while any(torch.equal(kaiming_uniform(p.A.shape, seed=module_seed(seed, index)), A) for A in used):
            seed += 1
        return seed


class InfLora(Lori):
    """LoRI whose frozen A avoids the live tasks' inputs (ours, after GPM and InfLoRA).

    A_t is LoRI's seeded random A with every row projected onto the orthogonal complement of the
    store's protected input subspace U (:mod:`adapters_store.subspace`), rescaled to its norm:
    A_t ← A_t (I − U Uᵀ). The earlier tasks' inputs lie (to a fraction ε of their energy) in
    span(U), so A_t x_old ≈ 0 and ΔW_t leaves their answers alone. The method stacks the earlier
    ΔW in the forward pass (``stack_history``), so B_t learns on the model it will be served in,
    and publishing grows U by this task's inputs (``protects_inputs``).
    """

    protects_inputs = True

    @property
    def wants_input_covariances(self) -> bool:
        """The loop measures this task's input covariance per module once the adapter is set up
        (on the model as it trains: base + the earlier tasks) and hands it to :meth:`orient`."""
        return self.hp.subspace_init == "inputs"

    @torch.no_grad()
    def orient(self, layers: Layers, covariances: dict[str, torch.Tensor]) -> None:
        """InfLoRA's A: for each module, the r free directions where this task's inputs have the
        most energy, scaled to the norm of LoRI's random rows (so lora_alpha keeps its meaning).
        Every row still avoids span(U); the task just stops wasting rank on directions its own
        inputs never use."""
        held = []
        solved: list[tuple[torch.Tensor, torch.Tensor | None, int, tuple[torch.Tensor, float]]] = []
        for name, p in layers.items():
            basis = self.subspace.bases.get(name) if self.subspace is not None else None
            C, rank = covariances[name], p.A.shape[0]
            # Modules reading one input (q/k/v, gate/up) get one covariance object and, grown
            # together, equal bases: one eigendecomposition between them.
            found = next((d for c, b, r, d in solved if c is C and r == rank and _same(b, basis)), None)
            if found is None:
                found = leading_free_directions(C, basis, rank)
                solved.append((C, basis, rank, found))
            rows, share = found  # (r, d_in), share of the task's energy they hold
            norms = p.A.norm(dim=1, keepdim=True).cpu()  # (r, 1): the random rows' norms
            p.A.copy_(rows * norms)
            held.append(share)
        self._metrics["input_energy_in_A"] = round(sum(held) / len(held), 4)

    def _frozen_A(self, name: str, A: torch.Tensor) -> torch.Tensor:
        basis = self.subspace.bases.get(name) if self.subspace is not None else None
        if basis is None:
            return A
        free = basis.shape[0] - basis.shape[1]
        if free < A.shape[0]:
            raise CapacityError(
                f"inflora: module {name} has {free} free input directions of {basis.shape[0]}, the task "
                f"needs r = {A.shape[0]}; lower hyperparameters.r, or start a new store (LAMINA_STORE)"
            )
        return project_rows(A, basis)


class OwnLora(Lora):
    """``own-lora``: each task's own LoRA, trained on the base model alone; the merge gets it off
    the protected input subspace (ours, after GPM).

    Under task routing a task's prompts are answered by its own model and every other prompt by
    the base, so nothing needs to stand between a task and the directions it learns best: A and
    B are both trained (LoRA's init), on W0 alone, which is exactly the per-task upper bound.
    What stays shared is the merge (routing ``merge``/``off`` and ``applies_to: all`` tasks): it
    receives ΔW_t (I − U Uᵀ), the update with every input direction the base's own text and the
    earlier tasks use taken out (:func:`off_subspace`), so the merge still leaves them where they
    were; publishing grows U by this task's inputs, as for ``inflora``. The share of the update the
    merge keeps is the job's ``merge_kept`` metric.
    """

    protects_inputs = True

    @staticmethod
    def merge_part(adapter: LoraAdapter, subspace: Subspace | None) -> tuple[LoraAdapter, float | None]:
        """Each module's A with span(U) removed (rows not rescaled: the part of ΔW_t that acts
        on inputs outside span(U), exactly), and ‖ΔW_t (I − UUᵀ)‖_F / ‖ΔW_t‖_F over the whole
        adapter. Without a subspace (the seed turned off, first task) the merge gets all of it."""
        if subspace is None:
            return adapter, None
        modules, kept, total = {}, 0.0, 0.0
        for name, module in adapter.modules.items():
            basis = subspace.bases.get(name)
            A = module.A if basis is None else off_subspace(module.A, basis)
            modules[name] = LoraModule(A=A, B=module.B, scale=module.scale)
            kept += float((module.B @ A).square().sum())
            total += float((module.B @ module.A).square().sum())
        share = math.sqrt(kept / total) if total > 0 else 1.0
        return LoraAdapter(modules=modules), share


class LoraF(_Base):
    """LoRAF (Zhang et al. 2025, Algorithm 1): one frozen A and one B shared by every task.

    Task t owns the positions M_t of B; the feasible set Ω is what no earlier task owns. The
    shared B starts as Σ_{i<t} B_i ⊙ M_i (so the forward pass sees the earlier tasks, line 3),
    calibration trains B on Ω only (line 5), M_t = top-k |ΔB| inside Ω (line 7, k per module:
    k = ⌊mask_fraction · d_out · r⌋ as the paper's K = ⌊(1 − s) d₁ r⌋ is per matrix), B is reset
    (line 8) and then trained on M_t only (line 10). Masks are disjoint by construction. The
    exported adapter is the shared A with B ⊙ M_t: only this task's own entries.

    Growth: when the store is full, the worker may train the task at a larger rank r' than
    the store's r (same scale). The shared A then gains r' − r fresh frozen rows below the old
    ones and B gains r' − r empty columns, so every earlier task's A is a prefix of the new A
    and its entries keep their positions; the new columns are all feasible.
    """

    def _prepare(self) -> None:
        self.calibration_steps = self.hp.calibration_steps
        self.start: dict[str, torch.Tensor] = {}  # B⁽⁰⁾ per module: the earlier tasks' entries
        self.feasible: dict[str, torch.Tensor] = {}  # Ω per module
        self.masks: dict[str, torch.Tensor] = {}  # M_t per module

    @torch.no_grad()
    def setup(self, layers: Layers) -> None:
        seed = self._task_seed()
        for index, name, p in _sorted(layers):
            if self.history:
                A, B0, owned = self._shared_state(name, p, module_seed(seed, index))
            else:
                A = kaiming_uniform(p.A.shape, seed=module_seed(seed, index))
                B0, owned = torch.zeros_like(p.B), torch.zeros(p.B.shape, dtype=torch.bool)
            self.start[name], self.feasible[name] = B0.to(p.B.device), ~owned.cpu()
            p.A.copy_(A)
            p.A.requires_grad_(False)
            p.B.copy_(B0)
        self._check_capacity(layers)
        self._mask(layers, self.feasible, self.start)
        if not self.history:
            self._metrics["a_seed"] = seed

    @torch.no_grad()
    def calibrate(self, layers: Layers) -> None:
        for name, p in layers.items():
            update = (p.B - self.start[name]).cpu()  # (d_out, r): ΔB of calibration
            self.masks[name] = feasible_topk_mask(update, self.feasible[name], self._k(p))
            p.B.copy_(self.start[name])
        self._mask(layers, self.masks, self.start)
        total = sum(m.numel() for m in self.masks.values())
        left = sum(
            int(f.sum()) - int(m.sum())
            for f, m in zip(self.feasible.values(), self.masks.values(), strict=True)
        )
        self._metrics.update(mask_density=sum(int(m.sum()) for m in self.masks.values()) / total)
        self._metrics.update(capacity_left=left / total, positions_left=left)

    def export(self, layers: Layers) -> LoraAdapter:
        adapter = super().export(layers)
        for name, module in adapter.modules.items():
            mask = self.masks[name]
            adapter.modules[name] = LoraModule(A=module.A, B=module.B * mask, scale=module.scale)
        adapter.masks = {name: mask.clone() for name, mask in self.masks.items()}
        return adapter

    def _k(self, p: LoraParams) -> int:
        d_out, rank = p.B.shape
        return loraf_mask_size(self.hp.mask_fraction, d_out, rank)

    def _shared_state(
        self, name: str, p: LoraParams, grow_seed: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(shared A, Σ earlier B_i ⊙ M_i, positions owned) for one module, from the history,
        widened with fresh frozen rows of A (and empty columns of B) when this task grows the rank."""
        widest = max(
            (a.modules[name] for a in self.history if name in a.modules), key=lambda m: m.rank, default=None
        )
        rank, new_rank = (widest.rank if widest else 0), p.A.shape[0]
        if (
            widest is None
            or rank > new_rank
            or widest.A.shape[1] != p.A.shape[1]
            or not math.isclose(widest.scale, p.scale)
        ):
            raise ValueError(f"loraf: module {name} of the store does not match r/lora_alpha/targets")
        A = widest.A.float()  # (r, d_in)
        if new_rank > rank:
            fresh = kaiming_uniform((new_rank - rank, A.shape[1]), seed=grow_seed)  # (r' − r, d_in)
            A = torch.cat([A, fresh])  # (r', d_in)
        B0 = torch.zeros(p.B.shape, dtype=torch.float32)  # (d_out, r')
        owned = torch.zeros(p.B.shape, dtype=torch.bool)
        for position, adapter in enumerate(self.history):
            module, mask = adapter.modules.get(name), adapter.masks.get(name)
            if module is None or mask is None or not torch.equal(module.A.float(), A[: module.rank]):
                raise ValueError(
                    f"loraf: task {position} of the store is not a loraf task sharing A (module {name}); "
                    "loraf needs every earlier task to be loraf"
                )
            B0[:, : module.rank] += module.B.float() * mask
            owned[:, : module.rank] |= mask
        return A, B0, owned

    def _check_capacity(self, layers: Layers) -> None:
        for name, p in layers.items():
            free, k = int(self.feasible[name].sum()), self._k(p)
            if free < k:
                raise CapacityError(
                    f"loraf: module {name} has {free} free B positions of {p.B.numel()}, the task needs "
                    f"{k} (mask_fraction={self.hp.mask_fraction}); lower mask_fraction, remove a task, "
                    "or start a store with a larger rank"
                )
