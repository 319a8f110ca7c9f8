"""Loss terms added to the task loss: ``l1`` (N-LoRA), ``stability`` (PS-LoRA), ``orthogonal`` (O-LoRA).

``l1`` and ``stability`` are sums of an entrywise function f over the full product
ΔW_t = scale · B_t A_t (d_out × d_in), which for a 7B model is as large as the base weights
themselves. They are computed in blocks of rows, and each block's ΔW is built exactly once a
step: the forward pass also works out the gradient with respect to B and A (f'(ΔW) is
entrywise, so dB = scale · f'(ΔW) Aᵀ and dA = scale · Bᵀ f'(ΔW) block by block) and autograd
only scales it in backward. No full d_out × d_in matrix of the *current* update is ever held,
and no block is recomputed (activation checkpointing, the obvious alternative, builds every
block twice). ``stability`` does keep one constant d_out × d_in tensor per module, tanh(α S) of
the earlier tasks, built on the first step: memory for time (bench/train measures both).

No cheap exact form of ``l1`` exists: ‖B A‖₁ is not a function of r × r products (unlike
‖B A‖²_F = tr((BᵀB)(A Aᵀ))), so each step pays one pass over the d_out × d_in entries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from adapters_store.lora import LoraAdapter
from trainer.config import STABILITY_ALPHA_RMS, Hyperparameters
from trainer.methods.registry import Layers

ROW_CHUNK = 512  # rows of ΔW per block: 512 × d_in fp32 floats = 8 MiB at d_in = 4096

# f over one block of ΔW rows: (the block's Σ f, f' entrywise). Gets the block and its row slice.
Entrywise = Callable[[torch.Tensor, slice], tuple[torch.Tensor, torch.Tensor]]


# ---------------------------------------------------------------------------------------------
# The math, as plain functions of tensors (tested against dense reference computations).


class _SumOverDelta(torch.autograd.Function):
    """Σᵢⱼ f(ΔW[i,j]) with ΔW = scale · B A, and its gradients, in one pass over row blocks."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, B: torch.Tensor, A: torch.Tensor, scale: float, f: Entrywise, chunk_rows: int
    ) -> torch.Tensor:
        want_grad = any(ctx.needs_input_grad[:2])
        total = A.new_zeros(())
        grad_B, grad_A = torch.zeros_like(B), torch.zeros_like(A)
        for start in range(0, B.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            value, slope = f(scale * (B[rows] @ A), rows)  # (rows, d_in) block of ΔW
            total += value
            if want_grad:
                grad_B[rows] = scale * (slope @ A.T)
                grad_A += scale * (B[rows].T @ slope)
        ctx.save_for_backward(grad_B, grad_A)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        grad_B, grad_A = ctx.saved_tensors
        return grad_output * grad_B, grad_output * grad_A, None, None, None


def _abs_entries(delta: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    return delta.abs().sum(), delta.sign()


def l1_of_delta(A: torch.Tensor, B: torch.Tensor, scale: float, chunk_rows: int = ROW_CHUNK) -> torch.Tensor:
    """‖scale · B A‖₁, the entrywise L1 norm of the full product (N-LoRA eq. 3), in row blocks."""
    return _SumOverDelta.apply(B, A, scale, _abs_entries, chunk_rows)  # type: ignore[no-any-return]


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
    concatenation; S_B already carries each task's scale). With no earlier task S = 0 and the
    loss is ‖ΔW_t‖²_F. A training run builds tanh(α S) once (:func:`sign_weights`) and calls
    :func:`stability_loss_weighted`; this form builds it per call.
    """
    return stability_loss_weighted(A, B, scale, sign_weights(S_B, S_A, alpha, chunk_rows), alpha, chunk_rows)


def sign_weights(
    S_B: torch.Tensor, S_A: torch.Tensor, alpha: float, chunk_rows: int = ROW_CHUNK
) -> torch.Tensor:
    """tanh(α S) (d_out, d_in) for S = S_B @ S_A, built a block of rows at a time.

    Constant during a task (S is the earlier tasks' sum), so it is built once per task: rebuilding
    it every step (a d_out × R × d_in product and a tanh per entry) was most of eq. 4's cost.
    """
    weights = S_A.new_empty(S_B.shape[0], S_A.shape[1])  # (d_out, d_in)
    for start in range(0, S_B.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        torch.tanh(alpha * (S_B[rows] @ S_A), out=weights[rows])
    return weights


def stability_loss_weighted(
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    weights: torch.Tensor | None,
    alpha: float,
    chunk_rows: int = ROW_CHUNK,
) -> torch.Tensor:
    """:func:`stability_loss` given tanh(α S) as ``weights`` (d_out, d_in); None means S = 0.

    Per block, the entrywise work is done in place on as few temporaries as possible: on a CPU
    these passes over d_out × d_in entries, not the rank-r products, are what the term costs.
    """

    def entries(delta: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        square = delta.square()  # ΔW²
        if weights is None:  # S = 0: Σ ΔW², slope 2ΔW
            return square.sum(), 2 * delta
        previous = weights[rows]  # tanh(α S), constant in training
        current = torch.tanh(alpha * delta)  # tanh(α ΔW)
        sign_term = torch.addcmul(torch.ones_like(delta), current, previous, value=-1)  # (b) of eq. 4
        value = torch.vdot(square.flatten(), sign_term.flatten())  # (a)·(b), summed over entries
        # d/dΔ [Δ² (1 − tanh(αΔ) P)] = 2Δ (1 − tanh(αΔ) P) − Δ² P α (1 − tanh²(αΔ))
        current.square_().sub_(1).mul_(alpha).mul_(previous).mul_(square)  # −α P Δ² (1 − tanh²(αΔ))
        slope = sign_term.mul_(delta).mul_(2).add_(current)
        return value, slope

    return _SumOverDelta.apply(B, A, scale, entries, chunk_rows)  # type: ignore[no-any-return]


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


class L1:
    """N-LoRA eq. 3 (and eq. 4's L_sparse): Σ_modules ‖ΔW_t‖₁, the L1 of the product B_t A_t.

    Not the L1 of an r × r product, which the paper's public code uses instead.
    """

    def __init__(self, hp: Hyperparameters, history: list[LoraAdapter]) -> None:
        pass

    def __call__(self, layers: Layers) -> torch.Tensor:
        return torch.stack([l1_of_delta(p.A, p.B, p.scale) for p in layers.values()]).sum()


def rms_of_product(B: torch.Tensor, A: torch.Tensor, chunk_rows: int = ROW_CHUNK) -> float:
    """√mean((B A)²) over all d_out × d_in entries, one block of rows at a time."""
    total = 0.0
    for start in range(0, B.shape[0], chunk_rows):
        total += float((B[start : start + chunk_rows] @ A).square().sum())
    return (total / (B.shape[0] * A.shape[1])) ** 0.5


class Stability:
    """PS-LoRA eq. 4 summed over modules, S per module from the earlier tasks (see stability_loss).

    α is ``hp.stability_alpha`` when given, else STABILITY_ALPHA_RMS / rms(S) per module: eq. 4's
    sign term only acts where |α·ΔW| and |α·S| are of order 1, and LoRA entries are ~1e-4–1e-3.
    """

    def __init__(self, hp: Hyperparameters, history: list[LoraAdapter]) -> None:
        self.fixed_alpha = hp.stability_alpha
        self.history = history
        self._previous: dict[str, tuple[torch.Tensor | None, float]] = {}

    def __call__(self, layers: Layers) -> torch.Tensor:
        terms = []
        for name, p in layers.items():
            weights, alpha = self._weights(name, p.B, p.A)
            terms.append(stability_loss_weighted(p.A, p.B, p.scale, weights, alpha))
        return torch.stack(terms).sum()

    def _weights(self, name: str, B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        """tanh(α S) of module ``name`` and its α, built on the first step and kept for the task:
        one d_out × d_in tensor per module (the size of the base weight it adapts, in B's dtype),
        in exchange for most of the term's time (bench/train)."""
        if name not in self._previous:
            stacked = history_factors(self.history, name)
            if stacked is None:  # S = 0: eq. 4 is ‖ΔW‖², no weights to keep; α is moot
                self._previous[name] = (None, 1.0)
                return self._previous[name]
            S_B, S_A = stacked[0].to(B.device), stacked[1].to(A.device)
            alpha = self.fixed_alpha
            if alpha is None:
                rms = rms_of_product(S_B, S_A)
                alpha = STABILITY_ALPHA_RMS / rms if rms > 0 else 1.0
            self._previous[name] = (sign_weights(S_B, S_A, alpha).to(B.dtype), alpha)
        return self._previous[name]


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
