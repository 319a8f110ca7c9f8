"""What a continual benchmark run measured: per method and seed, the accuracy matrix and its metrics.

``accuracy[i][j]`` is task j's test accuracy after training task i (the convention of
:mod:`trainer.suite.metrics`), from which AA, BWT, FWT, FWT0 and FR follow.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.continual.config import BenchmarkConfig
from trainer.suite.metrics import (
    AccuracyMatrix,
    average_accuracy,
    backward_transfer,
    forgetting_rate,
    forward_transfer,
)

METRIC_NAMES: tuple[str, ...] = (
    "AA", "BWT", "FWT", "FWT0", "FR", "GA", "GA_agree", "GA_kl", "GA_known", "ACR", "occupancy",
)  # fmt: skip


@dataclass
class MethodRun:
    """One method over one order with one seed.

    ``accuracy[i][j]`` is task j's test accuracy after training task i: filled for j <= i and,
    for FWT0, for j = i + 1 (the next task before it is trained); None elsewhere.
    """

    method: str
    seed: int
    accuracy: list[list[float | None]]
    metrics: dict[str, float | None]
    train_seconds: float
    eval_seconds: float
    final_losses: list[float]
    stats_error: str | None = None  # why ACR/occupancy are missing, if they are
    probe: list[float | None] = field(default_factory=list)  # general ability after each task
    subspace_reserved: list[float] = field(default_factory=list)  # inflora: fullest module after each task
    refused: list[int] = field(default_factory=list)  # tasks the store had no capacity for
    general: list[dict[str, Any]] = field(default_factory=list)  # GeneralScore.to_dict() after each task


@dataclass
class BenchmarkResult:
    """Everything one run measured, plus what is needed to reproduce it."""

    config: BenchmarkConfig
    tasks: list[str]
    test_sizes: list[int]
    zero_shot: list[float]  # base model, per task
    upper_bound: dict[int, list[float]]  # seed -> per-task accuracy of the task trained alone
    runs: list[MethodRun]
    machine: dict[str, Any]
    started_at: str
    wall_seconds: float
    git_commit: str | None
    base_fingerprint: str = ""  # adapters_store.fingerprint of the base model the numbers are for
    probe_size: int = 0  # questions the base model answered, which the probe keeps
    general_size: dict[str, int] = field(default_factory=dict)  # the general set's prompts and questions

    def runs_of(self, method: str) -> list[MethodRun]:
        return [run for run in self.runs if run.method == method]

    def summary(self) -> dict[str, dict[str, float | None]]:
        """Per method: each metric's mean over seeds (None when no seed has it) and its sample
        standard deviation over seeds (None with one seed)."""
        table: dict[str, dict[str, float | None]] = {}
        for method in self.config.methods:
            row: dict[str, float | None] = {}
            for name in METRIC_NAMES:
                values = _present(r.metrics.get(name) for r in self.runs_of(method))
                row[name] = statistics.fmean(values) if values else None
                row[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else None  # sample std
            table[method] = row
        return table

    def upper_bound_mean(self) -> list[float] | None:
        """Per-task accuracy of the tasks trained alone, averaged over seeds."""
        if not self.upper_bound:
            return None
        per_seed = list(self.upper_bound.values())
        return [statistics.fmean(seed[t] for seed in per_seed) for t in range(len(self.tasks))]

    def mean_matrix(self, method: str) -> list[list[float | None]]:
        """The method's accuracy matrix averaged over seeds (None where no seed filled it)."""
        runs = self.runs_of(method)
        size = len(self.tasks)
        matrix: list[list[float | None]] = []
        for i in range(size):
            row: list[float | None] = []
            for j in range(size):
                values = _present(r.accuracy[i][j] for r in runs)
                row.append(statistics.fmean(values) if values else None)
            matrix.append(row)
        return matrix


def _present(values: Iterable[float | None]) -> list[float]:
    """The values that were measured (a seed may lack one, e.g. ACR without the stats module)."""
    return [v for v in values if v is not None]


def matrix_metrics(
    acc: AccuracyMatrix, scratch: Sequence[float] | None, zero_shot: Sequence[float] | None
) -> dict[str, float | None]:
    """AA, BWT, FR, and the two forward transfers of one run's matrix.

    - AA (N-LoRA eq. 5), BWT (PS-LoRA A.2), FR (N-LoRA eq. 6): :mod:`trainer.suite.metrics`.
    - FWT (PS-LoRA A.2 as its Table 2 computes it): mean over i >= 2 of a_{i,i} − a_{scratch,i},
      the accuracy right after learning task i in sequence minus the task trained alone
      (``scratch``, the per-task upper bound). None without an upper bound.
    - FWT0 (the literal a_{i,i−1} of A.2; GEM's forward transfer): task i *before* it is trained,
      after the earlier tasks, minus the base model's zero-shot accuracy. None when the
      above-diagonal entries or ``zero_shot`` are missing.
    """
    size = len(acc)
    metrics: dict[str, float | None] = {
        "AA": average_accuracy(acc),
        "BWT": backward_transfer(acc),
        "FR": forgetting_rate(acc),
        "FWT": forward_transfer(acc, scratch) if scratch is not None else None,
        "FWT0": None,
    }
    has_next = all(acc[i - 1][i] is not None for i in range(1, size))
    if zero_shot is not None and has_next:
        metrics["FWT0"] = forward_transfer(acc, zero_shot, entry="previous")
    return metrics
