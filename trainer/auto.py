"""Hyper-parameters a user left out ("auto"): steps, learning rate and batch size, by rule.

A task posted with nothing but examples must learn. These rules were measured on the embedded
model and on SmolLM2-135M-Instruct with task shapes a user would post (``bench/defaults``: a few
dozen memorised facts; a rule over a hundred examples, scored on inputs it never saw); the
"Defaults that learn" table of docs/results.md holds the numbers behind each constant.

- batch size: ``min(BATCH, n)``: small batches give small tasks enough optimizer steps.
- steps: ``clamp(⌈MIN_EPOCHS · n / batch⌉, MIN_STEPS, MAX_STEPS)``: at least MIN_STEPS optimizer
  steps however few the examples (a handful of facts needs as many updates as a few dozen;
  they just repeat more often), and at least MIN_EPOCHS passes over a large task. When those
  are done and the completion loss (mean of the last LOSS_WINDOW steps) is still above
  LEARNED_LOSS, training goes on EXTEND_STEPS at a time, up to EXTEND_FACTOR × the planned steps
  (:func:`keep_going`): SmolLM2-135M learns the issue's task shapes in 100 steps, the embedded
  4M-parameter model needs about 200 for some (``bench/defaults``).
- learning rate: per parametrization (``LEARNING_RATE``): methods that train B alone behind a
  frozen A (LoRI, LoRAF, inflora) take a larger rate than LoRA, whose A moves too (5e-3 against
  2e-3; LoRA diverged at 1e-2 on the embedded model). A masked B (LoRI-S, LoRAF) trains only a
  share f of its entries; Adam moves each by about the rate per step, so the rate is divided by f
  (LoRI-S at 90 % sparsity: 10×, LoRI's own ratio between LoRI-S and LoRI-D), up to
  MAX_LEARNING_RATE.
"""

from __future__ import annotations

import math
from typing import Any

from trainer.config import Hyperparameters, MethodSpec
from trainer.methods import catalog

BATCH = 8
MIN_EPOCHS = 3
MIN_STEPS, MAX_STEPS = 100, 1000
# Each parametrization's rate for a fully trained B, registered with it in the catalogue.
LEARNING_RATE: dict[str, float] = {
    p.name: float(p.auto_learning_rate or 0) for p in catalog.parts("parametrization")
}
MAX_LEARNING_RATE = 0.05
LEARNED_LOSS = 0.1  # nats per completion token
LOSS_WINDOW = 10
EXTEND_STEPS = 20
EXTEND_FACTOR = 2
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
            update["steps"] = chosen["steps"] = min(max(MIN_EPOCHS * per_epoch, MIN_STEPS), MAX_STEPS)
    if hp.learning_rate is None:
        rate = min(LEARNING_RATE[method.parametrization] / trained_share(hp, method), MAX_LEARNING_RATE)
        update["learning_rate"] = chosen["learning_rate"] = rate
    return hp.model_copy(update=update), chosen


def keep_going(losses: list[float], planned: int) -> bool:
    """Whether auto-chosen training should run past its planned steps: the last steps' mean
    completion loss is still above LEARNED_LOSS, and fewer than EXTEND_FACTOR × planned ran."""
    if len(losses) >= min(EXTEND_FACTOR * planned, MAX_STEPS):
        return False
    recent = losses[-LOSS_WINDOW:]
    return bool(recent) and sum(recent) / len(recent) > LEARNED_LOSS


def trained_share(hp: Hyperparameters, method: MethodSpec) -> float:
    """The share of B's entries a task trains: its mask's density (LoRI-S, LoRAF), else 1."""
    knobs = catalog.get("parametrization", method.parametrization).knob_names
    if "mask_fraction" in knobs:  # LoRAF: each task owns that share of B
        return hp.mask_fraction
    if "sparsity" in knobs:  # LoRI-S (and inflora, at sparsity 0): the kept share of B
        return 1.0 - method.effective_sparsity(hp)
    return 1.0
