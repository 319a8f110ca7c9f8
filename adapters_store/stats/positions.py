"""Which ΔW positions a module's position-wise measures (CR, sign shares, sparsity) are
evaluated on: all of them in a small module, a seeded uniform sample in a large one.

Its own module because every task of a module must be evaluated on the very same positions
(the kept per-position state of earlier tasks lines up with them), so they are drawn in one
place, from (seed, module name) only, and cached.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

import torch

from adapters_store.stats.params import StatsParams


@dataclass(frozen=True)
class Positions:
    """The ΔW positions a module's position-wise measures are evaluated on."""

    shape: tuple[int, int]
    rows: torch.Tensor | None  # (n,) int64; None: all d_out · d_in positions, row-major (exact)
    cols: torch.Tensor | None

    @property
    def exact(self) -> bool:
        return self.rows is None

    @property
    def count(self) -> int:
        return self.shape[0] * self.shape[1] if self.rows is None else int(self.rows.numel())


def positions_for(module: str, shape: tuple[int, int], params: StatsParams) -> Positions:
    """All positions when there are at most ``exact_up_to`` of them, else a seeded uniform sample
    (with replacement, so each sampled share is a mean of i.i.d. indicators). The seed mixes in
    the module name: modules get independent samples. Cached: every task of a module needs them."""
    return _positions(module, shape, params.exact_up_to, params.sample_size, params.seed)


@functools.lru_cache(maxsize=1024)
def _positions(
    module: str, shape: tuple[int, int], exact_up_to: int, sample_size: int, seed: int
) -> Positions:
    d_out, d_in = shape
    if d_out * d_in <= exact_up_to:
        return Positions(shape, None, None)
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{module}".encode()))
    flat = torch.randint(d_out * d_in, (sample_size,), generator=g)
    return Positions(shape, flat // d_in, flat % d_in)
