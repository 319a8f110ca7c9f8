"""Low-rank approximations of weight updates: the one truncated SVD every export and correction uses.

Two places turn a ΔW into a LoRA of bounded rank: a dense merge exported as a PEFT adapter
(:meth:`adapters_store.merges.DenseDelta.to_lora_svd`) and the server's corrections relative to
the live weights (``server/swap/corrections.py``). Both keep the top singular directions
(Eckart–Young) and report the relative error from the energy left out, so they share these
functions rather than two SVD routines that could drift apart.
"""

from __future__ import annotations

import torch

from adapters_store.lora import LoraModule

OVERSAMPLE = 16
"""Extra columns of the randomized range finder beyond the rank asked for."""


def top_singular(
    delta: torch.Tensor, max_rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Top singular directions of a dense C (d_out, d_in) and the energy ‖C‖² left outside them.

    A full SVD when C is small against ``max_rank``; otherwise a randomized range finder (Halko et
    al.: C·Ω, two power iterations, QR) of width max_rank + ``OVERSAMPLE`` and the exact SVD of
    Qᵀ·C, which costs O(d_out · d_in · width) instead of a full SVD's O(d_out · d_in · min(d)).
    The directions are then Q's top ones, and the error reported for them is exact
    (‖C − P·C‖² = ‖C‖² − ‖P·C‖² for the orthogonal projection P), if slightly above the optimum.
    Returns U (d_out, m), S (m,) descending, Vh (m, d_in) and that left-out energy."""
    width = max_rank + OVERSAMPLE
    if 2 * width >= min(delta.shape):
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        return U, S, Vh, 0.0
    generator = torch.Generator().manual_seed(0)  # the same export and correction every time
    omega = torch.randn(delta.shape[1], width, generator=generator, dtype=delta.dtype)  # (d_in, w)
    Q, _ = torch.linalg.qr(delta @ omega)  # (d_out, w)
    for _ in range(2):  # power iterations sharpen the range when the spectrum decays slowly
        Q, _ = torch.linalg.qr(delta.T @ Q)
        Q, _ = torch.linalg.qr(delta @ Q)
    U, S, Vh = torch.linalg.svd(Q.T @ delta, full_matrices=False)  # (w, w) (w,) (w, d_in)
    rest_sq = max(float(delta.norm() ** 2) - float((S**2).sum()), 0.0)
    return Q @ U, S, Vh, rest_sq


def factored_svd(
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of Σ B_i A_i without forming it: QR of the stacked factors, SVD of the k × k core.
    Exact (no directions left out), so a sum of LoRAs never pays for a d_out × d_in matrix."""
    B = torch.cat([b for b, _ in pairs], dim=1)  # (d_out, k)
    A = torch.cat([a for _, a in pairs], dim=0)  # (k, d_in)
    Qb, Rb = torch.linalg.qr(B)  # (d_out, k'), (k', k)
    Qa, Ra = torch.linalg.qr(A.T)  # (d_in, k''), (k'', k)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)  # core (k', k'')
    return Qb @ U, S, Vh @ Qa.T  # (d_out, m), (m,), (m, d_in)


def balanced_factors(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, keep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``keep`` directions as LoRA factors B = U·√S, A = √S·Vᵀ, so neither factor dominates."""
    root = S[:keep].sqrt()
    return U[:, :keep] * root, root[:, None] * Vh[:keep]


def padded(B: torch.Tensor, A: torch.Tensor, rank: int) -> LoraModule:
    """Zero-pad to ``rank`` (PEFT's layout has one rank per adapter), fp32, scale 1."""
    Bp = torch.zeros(B.shape[0], rank, dtype=torch.float64)
    Ap = torch.zeros(rank, A.shape[1], dtype=torch.float64)
    Bp[:, : B.shape[1]], Ap[: A.shape[0]] = B, A
    return LoraModule(A=Ap.float(), B=Bp.float(), scale=1.0)
