"""Confidence intervals and the coarsened KL that the general-ability set reports
(:mod:`trainer.suite.general`): a share with its Wilson interval, a mean with its normal one, and
KL(base ‖ model) over the base's top-k tokens plus one "rest" bucket."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Interval:
    """A point estimate with its 95 % confidence interval over ``n`` observations."""

    value: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n}


def wilson(successes: int, n: int, z: float = 1.96) -> Interval:
    """The share ``successes / n`` with its Wilson score interval.

    Wilson rather than the normal approximation because the shares here sit near 1, where the
    normal interval runs past 1 and is too narrow. ``n == 0``: value NaN, interval [0, 1].
    """
    if n == 0:
        return Interval(math.nan, 0.0, 1.0, 0)
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} outside 0..{n}")
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low = 0.0 if successes == 0 else max(0.0, center - half)  # exact at the ends (no rounding)
    high = 1.0 if successes == n else min(1.0, center + half)
    return Interval(p, low, high, n)


def mean_interval(values: Sequence[float], z: float = 1.96) -> Interval:
    """The mean of ``values`` with a normal-approximation interval (sample standard deviation).

    The per-prompt KLs are many independent draws, so the mean is close to normal. Fewer than
    two values leave the spread unknown: the bounds are NaN (and the value too for none).
    """
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    half = z * math.sqrt(variance / n)
    return Interval(mean, mean - half, mean + half, n)


# ---------------------------------------------------------------------------------------------
# The coarsened KL


def topk_kl(
    base_logprobs_topk: torch.Tensor,
    base_ids_topk: torch.Tensor,
    model_logprobs_full: torch.Tensor,
    base_rest_logprob: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-position KL(base ‖ model) over ``k + 1`` buckets: the base's top-k ids and the rest.

    ``base_logprobs_topk`` and ``base_ids_topk`` are (..., k), ``model_logprobs_full`` (..., V)
    normalized log-probs; the result is (...). Coarsening both distributions the same way keeps
    a lower bound on the full KL (the data-processing inequality) while storing only k + 1
    numbers per position of the base. ``base_rest_logprob`` (...) is the log of the base's mass
    outside its top k, exact when stored from the full distribution; without it the rest is
    taken as 1 − Σ top-k (less precise when the top k hold nearly all the mass).
    """
    ids = base_ids_topk.long()
    base = base_logprobs_topk.float()
    full = model_logprobs_full.float()
    model_topk = full.gather(-1, ids)  # (..., k)
    model_rest = full.scatter(-1, ids, -math.inf).logsumexp(-1)  # (...)
    if base_rest_logprob is None:
        base_rest = torch.log((1 - base.exp().sum(-1)).clamp(min=0))
    else:
        base_rest = base_rest_logprob.float()
    head = (base.exp() * (base - model_topk)).sum(-1)
    base_rest_mass = base_rest.exp()
    rest = torch.where(base_rest_mass > 0, base_rest_mass * (base_rest - model_rest), torch.zeros_like(head))
    return head + rest
