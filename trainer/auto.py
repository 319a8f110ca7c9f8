"""Hyper-parameters a user left out ("auto"): steps, learning rate and batch size, by rule.

A task posted with nothing but examples must learn. These rules were measured on the embedded
model and on SmolLM2-135M-Instruct with task shapes a user would post (``bench/defaults``: a few
dozen memorised facts; a rule over a hundred examples, scored on inputs it never saw); the
README's "Defaults that learn" table holds the numbers behind each constant.

- batch size: ``min(BATCH, n)``: small batches give small tasks enough optimizer steps.
- steps: enough passes that every example is seen about ``PRESENTATIONS`` times in total over
  the task, ``epochs = clamp(⌈PRESENTATIONS / n⌉, MIN_EPOCHS, MAX_EPOCHS)``, then
  ``steps = clamp(⌈epochs · n / batch⌉, MIN_STEPS, MAX_STEPS)``; big tasks get few epochs.
- learning rate: per parametrization (``LEARNING_RATE``): methods that train B alone behind a
  frozen random A (LoRI, LoRAF, inflora) need a larger rate than LoRA, whose A moves too; a
  sparse B (LoRI-S) trains a tenth of the entries and gets ``SPARSE_LR_FACTOR`` more, after LoRI's
  own ratio between LoRI-S and LoRI-D.

Imports nothing heavy: the API imports it to show what a job will use.
"""

from __future__ import annotations

import math
from typing import Any

from trainer.config import Hyperparameters, MethodSpec

BATCH = 8
PRESENTATIONS = 800
MIN_EPOCHS, MAX_EPOCHS = 3, 25
MIN_STEPS, MAX_STEPS = 30, 1000
LEARNING_RATE = {"lora": 2e-3, "lori": 5e-3, "inflora": 5e-3, "loraf": 5e-3}
SPARSE_LR_FACTOR = 2.0
MIN_HELD_OUT_TASK = 50  # examples a task needs before a share of them is held out
MIN_HELD_OUT = 5


def held_out_count(n_examples: int, fraction: float) -> int:
    """Examples kept out of training to measure the task on unseen inputs: none for small tasks
    (a user posting 40 facts wants all 40 learned), else ⌈fraction · n⌉ but at least MIN_HELD_OUT."""
    if fraction <= 0 or n_examples < MIN_HELD_OUT_TASK:
        return 0
    return max(MIN_HELD_OUT, math.ceil(fraction * n_examples))


def resolve(
    hp: Hyperparameters, method: MethodSpec, n_examples: int
) -> tuple[Hyperparameters, dict[str, Any]]:
    """``hp`` with every auto field filled for a task of ``n_examples`` training examples, and which
    fields were chosen (for the job's metrics)."""
    chosen: dict[str, Any] = {}
    batch = hp.batch_size
    if batch is None:
        batch = chosen["batch_size"] = min(BATCH, n_examples)
    update: dict[str, Any] = {"batch_size": batch}
    if hp.steps is None:
        per_epoch = math.ceil(n_examples / batch)
        if hp.epochs is not None:
            update["steps"] = hp.epochs * per_epoch
        else:
            epochs = min(max(math.ceil(PRESENTATIONS / n_examples), MIN_EPOCHS), MAX_EPOCHS)
            update["steps"] = chosen["steps"] = min(max(epochs * per_epoch, MIN_STEPS), MAX_STEPS)
    if hp.learning_rate is None:
        rate = LEARNING_RATE[method.parametrization]
        if method.effective_sparsity(hp) > 0 and method.parametrization in ("lori", "inflora"):
            rate *= SPARSE_LR_FACTOR
        update["learning_rate"] = chosen["learning_rate"] = rate
    return hp.model_copy(update=update), chosen
