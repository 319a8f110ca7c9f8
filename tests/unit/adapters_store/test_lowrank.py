"""The one truncated SVD (adapters_store.lowrank): the randomized range finder that large
matrices take finds the same top directions as a full SVD, and the energy it reports as left out
is exactly what its directions miss, so exports and corrections report true errors."""

from __future__ import annotations

import torch

from adapters_store.lowrank import balanced_factors, factored_svd, padded, top_singular
from adapters_store.merges import DenseDelta


def low_rank_plus_noise(d_out: int, d_in: int, rank: int, noise: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    B = torch.randn(d_out, rank, generator=generator, dtype=torch.float64)
    A = torch.randn(rank, d_in, generator=generator, dtype=torch.float64)
    return B @ A + noise * torch.randn(d_out, d_in, generator=generator, dtype=torch.float64)


def test_a_large_matrix_takes_the_randomized_path_and_finds_the_top_directions() -> None:
    C = low_rank_plus_noise(300, 260, rank=12, noise=1e-3)
    U, S, Vh, rest_sq = top_singular(C, max_rank=8)
    assert S.numel() == 8 + 16 < min(C.shape), "the range finder's width, not a full SVD"
    exact = torch.linalg.svdvals(C)
    torch.testing.assert_close(S[:12], exact[:12], rtol=1e-6, atol=0.0)
    # what it reports as left out is what its directions miss
    captured = U @ torch.diag(S) @ Vh
    assert abs(rest_sq - float((C - captured).norm() ** 2)) <= 1e-6 * rest_sq + 1e-9


def test_a_small_matrix_gets_the_full_svd() -> None:
    C = low_rank_plus_noise(20, 30, rank=3, noise=0.1)
    U, S, Vh, rest_sq = top_singular(C, max_rank=8)
    assert rest_sq == 0.0 and S.numel() == 20
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, C)


def test_factored_svd_of_a_sum_of_products_matches_the_dense_one() -> None:
    generator = torch.Generator().manual_seed(2)
    pairs = [
        (
            torch.randn(40, 4, generator=generator, dtype=torch.float64),
            torch.randn(4, 50, generator=generator, dtype=torch.float64),
        )
        for _ in range(3)
    ]
    U, S, Vh = factored_svd(pairs)
    dense = sum(B @ A for B, A in pairs)
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, dense)
    B, A = balanced_factors(U, S, Vh, keep=12)
    module = padded(B, A, rank=16)
    assert module.B.shape == (40, 16) and module.A.shape == (16, 50) and module.scale == 1.0
    torch.testing.assert_close(module.B.double() @ module.A.double(), dense, rtol=1e-5, atol=1e-5)


def test_a_dense_export_reports_the_eckart_young_error() -> None:
    C = low_rank_plus_noise(300, 260, rank=40, noise=0.05).float()
    adapter, error = DenseDelta({"m": C}).to_lora_svd(8)
    S = torch.linalg.svdvals(C.double())
    optimum = float((S[8:] ** 2).sum().sqrt() / S.norm())
    served = adapter.modules["m"].B.double() @ adapter.modules["m"].A.double()
    actual = float((C.double() - served).norm() / C.double().norm())
    assert abs(error - actual) < 1e-4, "the reported error is the served adapter's"
    assert optimum <= actual < optimum * 1.01, "within 1 % of the best rank-8 approximation"
