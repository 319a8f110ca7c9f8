"""How the statistics are computed (:class:`StatsParams`) and the schema of their JSON view.

Its own module because the parameters are part of every cache key (:mod:`adapters_store.stats_cache`
compares them with a cached file's copy) and every other module of the package reads them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

STATS_SCHEMA = 2  # 2: CR/ACR at several ε (``eps_levels``, the ``*_by_eps`` keys)


@dataclass(frozen=True)
class StatsParams:
    """How the statistics are computed. Part of the cache key: other params, other numbers."""

    eps: float = 1e-3
    """The primary threshold: an entry is *active* when |x| > eps · (max |x| of the same task and
    module). The single-ε fields (cr_dw, acr_dw, cr_b, acr_b, density_dw, sign shares) use it."""
    eps_levels: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    """Every ε that CR and ACR are reported at (the ``*_by_eps`` fields), ascending, no repeats;
    ``eps`` is added when missing, so the primary is always one of them. Each level costs |P| +
    d_out · R bits per task and module (see the module docstring)."""
    exact_up_to: int = 1 << 16
    """Modules with at most this many positions (256 × 256) are evaluated on all of them."""
    sample_size: int = 1 << 14
    """Positions sampled in each larger module (standard error of a share ≤ 0.5/√sample_size)."""
    seed: int = 0
    """Seeds the sampled positions (together with the module name)."""
    row_chunk: int = 256
    """Rows of ΔW formed at once in the exact passes (bounds memory to row_chunk · d_in floats)."""

    def __post_init__(self) -> None:
        levels = tuple(float(e) for e in self.eps_levels)  # a JSON list (a cache header) as well
        for eps in (self.eps, *levels):
            if not (0.0 <= eps < 1.0 and math.isfinite(eps)):
                raise ValueError(f"eps and every eps level must be in [0, 1), got {eps}")
        if list(levels) != sorted(set(levels)):
            raise ValueError(f"eps_levels must be ascending without repeats, got {levels}")
        if self.eps not in levels:
            levels = tuple(sorted((*levels, float(self.eps))))
        object.__setattr__(self, "eps_levels", levels)  # frozen: normalized once, here
        if self.sample_size < 1 or self.exact_up_to < 0:
            raise ValueError(
                f"need sample_size >= 1 and exact_up_to >= 0, got {self.sample_size}, {self.exact_up_to}"
            )
        if self.row_chunk < 1:
            raise ValueError(f"row_chunk must be >= 1, got {self.row_chunk}")

    @property
    def primary(self) -> int:
        """The index of ``eps`` in ``eps_levels``."""
        return self.eps_levels.index(self.eps)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples as lists), so that it compares equal to a cached file's copy."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def eps_key(eps: float) -> str:
    """The key of a level in the ``*_by_eps`` JSON objects: the shortest round-tripping decimal
    (1e-3 → "0.001"), so distinct levels never share a key and ``float(key)`` gives ε back."""
    return repr(float(eps))
