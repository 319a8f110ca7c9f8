"""Continual-learning metrics from an accuracy matrix, as the seed papers define them.

Lamina's convention (one convention for every caller): ``acc[i][j]`` is the test accuracy on
task ``j`` after training task ``i``, 0-based, for a run over T tasks; ``acc`` is T x T. The
lower triangle with the diagonal (``j <= i``) must be filled; entries above it (tasks not yet
trained) may be ``None`` or NaN, and are only read by FWT's ``entry="previous"`` variant.

The papers index the other way round (PS-LoRA A.2: ``a_{i,j}`` is the accuracy on task i after
training task j, 1-based), so paper ``a_{i,j}`` is ``acc[j-1][i-1]`` here. Each docstring quotes
its paper equation in the paper's own indices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

AccuracyMatrix = Sequence[Sequence[float | None]]


def _entry(acc: AccuracyMatrix, stage: int, task: int) -> float:
    value = acc[stage][task]
    if value is None or math.isnan(value):
        raise ValueError(f"accuracy on task {task} after training task {stage} is missing")
    return float(value)


def _size(acc: AccuracyMatrix) -> int:
    size = len(acc)
    if size == 0 or any(len(row) != size for row in acc):
        raise ValueError("the accuracy matrix must be square and non-empty (T x T)")
    return size


def average_accuracy(acc: AccuracyMatrix, test_sizes: Sequence[int] | None = None) -> float:
    """AA: mean accuracy over all T tasks after training the last one.

    N-LoRA eq. (5): A_T = (1/T) Σ_{i=1..T} a_{i,T}. With ``test_sizes`` it is PS-LoRA's
    sample-weighted form (Appendix A.2): Acc = Σ_i |D_i| a_{i,N} / Σ_i |D_i|.
    """
    size = _size(acc)
    final = [_entry(acc, size - 1, task) for task in range(size)]
    if test_sizes is None:
        return sum(final) / size
    if len(test_sizes) != size:
        raise ValueError(f"{len(test_sizes)} test sizes for {size} tasks")
    return sum(n * a for n, a in zip(test_sizes, final, strict=True)) / sum(test_sizes)


def backward_transfer(acc: AccuracyMatrix) -> float:
    """BWT: how much training later tasks changed each earlier task (negative = forgetting).

    PS-LoRA Appendix A.2: BWT = 1/(N-1) Σ_{i=1..N-1} (a_{i,N} - a_{i,i}). 0.0 for one task.
    """
    size = _size(acc)
    if size < 2:
        return 0.0
    last = size - 1
    return sum(_entry(acc, last, t) - _entry(acc, t, t) for t in range(last)) / last


def forward_transfer(
    acc: AccuracyMatrix,
    scratch: Sequence[float],
    *,
    entry: Literal["diagonal", "previous"] = "diagonal",
) -> float:
    """FWT: how learning the earlier tasks helps (or hurts) each new task.

    PS-LoRA Appendix A.2: FWT = 1/(N-1) Σ_{i=2..N} (a_{i,i-1} - a_{scratch,i}), where
    a_{scratch,i} is the accuracy of task i trained from scratch (``scratch[i]``, one per task;
    ``scratch[0]`` is not used). The paper's prose ("how prior tasks influence new task
    learning", compared against training the task from scratch) needs the accuracy *after*
    learning task i in sequence, a_{i,i} -- ``entry="diagonal"``, the default, which the lower
    triangle provides. ``entry="previous"`` reads the formula literally, a_{i,i-1}: the accuracy
    on task i *before* it is trained (``acc[i-1][i]``, above the diagonal); with ``scratch``
    being the base model's accuracy this is GEM's forward transfer. 0.0 for one task.
    """
    size = _size(acc)
    if len(scratch) != size:
        raise ValueError(f"{len(scratch)} scratch accuracies for {size} tasks")
    if size < 2:
        return 0.0
    stage_offset = 0 if entry == "diagonal" else -1
    gains = [_entry(acc, t + stage_offset, t) - scratch[t] for t in range(1, size)]
    return sum(gains) / (size - 1)


def forgetting_rate(acc: AccuracyMatrix) -> float:
    """FR: mean drop of each earlier task from its best accuracy to its final accuracy.

    N-LoRA eq. (6) (Chaudhry et al., 2018): F_T = 1/(T-1) Σ_{t=1..T-1} (max_{k=t..T-1} a_{k,t}
    - a_{T,t}). Eq. (6) writes stage first, task second (the reverse of its eq. (5)): the best
    accuracy on task t is taken over the stages from training task t to the one before last. PS-LoRA A.2 writes the max as max_{j<=i} a_{i,j}; in its own indices that ranges over
    stages before task i was trained, which with a lower triangle reduces to a_{i,i} (FR = -BWT),
    while its prose ("from its peak (during training) to the final performance") is N-LoRA's
    definition, used here. 0.0 for one task.
    """
    size = _size(acc)
    if size < 2:
        return 0.0
    last = size - 1
    drops = [max(_entry(acc, k, t) for k in range(t, last)) - _entry(acc, last, t) for t in range(last)]
    return sum(drops) / last


def seen_task_accuracy(acc: AccuracyMatrix) -> list[float]:
    """Mean accuracy over the tasks seen so far, after each stage (PS-LoRA Fig. 1a's curve):
    entry i is (1/(i+1)) Σ_{j<=i} acc[i][j]; its last value is AA."""
    size = _size(acc)
    return [sum(_entry(acc, i, j) for j in range(i + 1)) / (i + 1) for i in range(size)]


def summarize(
    acc: AccuracyMatrix, scratch: Sequence[float] | None = None, test_sizes: Sequence[int] | None = None
) -> dict[str, float]:
    """AA, BWT, FR and (when ``scratch`` is given) FWT of one run, keyed by their short names."""
    result = {
        "AA": average_accuracy(acc, test_sizes),
        "BWT": backward_transfer(acc),
        "FR": forgetting_rate(acc),
    }
    if scratch is not None:
        result["FWT"] = forward_transfer(acc, scratch)
    return result
