"""Loss terms added to the task loss: ``l1`` (N-LoRA), ``stability`` (PS-LoRA), ``orthogonal`` (O-LoRA).

``l1`` and ``stability`` are functions of the full product ΔW_t = scale · B_t A_t (d_out × d_in),
which for a 7B model is as large as the base weights themselves. They are therefore computed in
blocks of rows, each block under activation checkpointing: autograd keeps only the block's inputs
(a slice of B and A) and recomputes the block's ΔW during backward, so no full d_out × d_in
matrix is ever held, not even by the autograd graph.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from adapters_store.lora import LoraAdapter
from trainer.config import Hyperparameters
from trainer.methods.registry import Layers, register_regularizer

ROW_CHUNK = 512  # rows of ΔW per block: 512 × d_in fp32 floats = 8 MiB at d_in = 4096


# ---------------------------------------------------------------------------------------------
# The math, as plain functions of tensors (tested against dense reference computations).


def _l1_block(B_rows: torch.Tensor, A: torch.Tensor, scale: float) -> torch.Tensor:
    return (scale * B_rows @ A).abs().sum()  # (rows, r) @ (r, d_in) -> scalar


def l1_of_delta(A: torch.Tensor, B: torch.Tensor, scale: float, chunk_rows: int = ROW_CHUNK) -> torch.Tensor:
    """‖scale · B A‖₁, the entrywise L1 norm of the full product (N-LoRA eq. 3), in row blocks."""
    total = A.new_zeros(())
    for start in range(0, B.shape[0], chunk_rows):
        total = total + checkpoint(_l1_block, B[start : start + chunk_rows], A, scale, use_reentrant=False)
    return total


def _stability_block(
    B_rows: torch.Tensor,
    A: torch.Tensor,
    scale: float,
    S_B_rows: torch.Tensor,
    S_A: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    delta = scale * B_rows @ A  # (rows, d_in): ΔW_t block
    previous = S_B_rows @ S_A  # (rows, d_in): S = Σ_{i<t} ΔW_i block
    sign_term = 1 - torch.tanh(alpha * delta) * torch.tanh(alpha * previous)  # (b) of eq. 4
    return (delta.square() * sign_term).sum()  # (a)·(b), summed over entries


def stability_loss(
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    S_A: torch.Tensor,
    S_B: torch.Tensor,
    alpha: float,
    chunk_rows: int = ROW_CHUNK,
) -> torch.Tensor:
    """PS-LoRA eq. 4: Σᵢⱼ ΔW_t[i,j]² · (1 − tanh(α ΔW_t[i,j]) · tanh(α S[i,j])).

    (a) the squared magnitude of the new update, weighted by (b) a sign-alignment factor: ≈ 0
    where ΔW_t agrees in sign with the earlier tasks' sum S = Σ_{i<t} ΔW_i, ≈ 2 where it
    flips it. The earlier tasks enter as one low-rank factorisation S = S_B @ S_A (their
    concatenation; S_B already carries each task's scale), so S is also built block by block.
    With no earlier task S = 0 and the loss is ‖ΔW_t‖²_F.
    """
    total = A.new_zeros(())
    for start in range(0, B.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        total = total + checkpoint(
            _stability_block, B[rows], A, scale, S_B[rows], S_A, alpha, use_reentrant=False
        )
    return total


def orthogonal_loss(A: torch.Tensor, previous_A: torch.Tensor) -> torch.Tensor:
    """O-LoRA (N-LoRA eq. 1): Σ_{i<t} ‖A_i A_tᵀ‖²_F, with the A_i stacked as ``previous_A`` (R, d_in).

    The paper writes A_iᵀ A_t for A of shape (d_in, r); in PEFT's (r, d_in) layout that is A_i A_tᵀ.
    Stacking is exact: the squared Frobenius norm of the stacked product is the sum over tasks.
    """
    return (previous_A @ A.T).square().sum()  # (R, d_in) @ (d_in, r) -> (R, r) -> scalar


def history_factors(history: list[LoraAdapter], name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The earlier tasks' updates of one module as one factorisation Σ_i ΔW_i = B_cat @ A_cat.

    A_cat = vstack(A_i) (R, d_in) and B_cat = hstack(scale_i · B_i) (d_out, R), R = Σ r_i; the
    B_i are stored already masked. None if no earlier task adapted this module.
    """
    modules = [adapter.modules[name] for adapter in history if name in adapter.modules]
    if not modules:
        return None
    A_cat = torch.cat([m.A.float() for m in modules], dim=0)  # (R, d_in)
    B_cat = torch.cat([m.scale * m.B.float() for m in modules], dim=1)  # (d_out, R)
    return B_cat, A_cat


# ---------------------------------------------------------------------------------------------
# Registered regularizers: sum the math over the task's modules.


@register_regularizer("l1")
class L1:
    """N-LoRA eq. 3 (and eq. 4's L_sparse): Σ_modules ‖ΔW_t‖₁, the L1 of the product B_t A_t.

    Not the L1 of an r × r product, which the paper's public code uses instead.
    """

    def __init__(self, hp: Hyperparameters, history: list[LoraAdapter]) -> None:
        pass

    def __call__(self, layers: Layers) -> torch.Tensor:
        return torch.stack([l1_of_delta(p.A, p.B, p.scale) for p in layers.values()]).sum()


@register_regularizer("stability")
class Stability:
    """PS-LoRA eq. 4 summed over modules, S per module from the earlier tasks (see stability_loss)."""

    def __init__(self, hp: Hyperparameters, history: list[LoraAdapter]) -> None:
        self.alpha = hp.stability_alpha
        self.history = history
        self._previous: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, layers: Layers) -> torch.Tensor:
        terms = []
        for name, p in layers.items():
            S_B, S_A = self._factors(name, p.B, p.A)
            terms.append(stability_loss(p.A, p.B, p.scale, S_A, S_B, self.alpha))
        return torch.stack(terms).sum()

    def _factors(self, name: str, B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self._previous:
            stacked = history_factors(self.history, name)
            if stacked is None:  # S = 0: a rank-1 zero factorisation keeps one code path
                stacked = (B.new_zeros(B.shape[0], 1), A.new_zeros(1, A.shape[1]))
            self._previous[name] = (stacked[0].to(B.device), stacked[1].to(A.device))
        return self._previous[name]


@register_regularizer("orthogonal")
class Orthogonal:
    """O-LoRA's orthogonality loss Σ_modules Σ_{i<t} ‖A_i A_tᵀ‖²_F (N-LoRA eq. 1 / OO eq. 7)."""

    def __init__(self, hp: Hyperparameters, history: list[LoraAdapter]) -> None:
        self.history = history
        self._previous: dict[str, torch.Tensor | None] = {}

    def __call__(self, layers: Layers) -> torch.Tensor:
        terms = [next(iter(layers.values())).A.new_zeros(())]
        for name, p in layers.items():
            previous_A = self._stacked_A(name, p.A.device)
            if previous_A is not None:
                terms.append(orthogonal_loss(p.A, previous_A))
        return torch.stack(terms).sum()

    def _stacked_A(self, name: str, device: torch.device) -> torch.Tensor | None:
        if name not in self._previous:
            stacked = history_factors(self.history, name)
            self._previous[name] = None if stacked is None else stacked[1].to(device)
        return self._previous[name]
