"""What one run of the continual benchmark measures: methods, seeds, tasks, per-task training.

Imports no torch, so the command line validates its options before loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from trainer.config import PRESETS, Hyperparameters, resolve_method
from trainer.contract.settings import VLLM_LORA_RANKS, LaminaSettings, default_base_model_dir
from trainer.suite import get_order

UPPER_BOUND = "per-task"  # the row of tasks trained alone; not a method of the store
UPPER_BOUND_METHOD = "inc-lora"  # trained with an empty history, so: plain LoRA on the base
ALL_METHODS: tuple[str, ...] = tuple(PRESETS)  # the catalogue's presets, baselines first
RANK = 8  # every task, every method (the setting)
LORA_ALPHA = 16


def server_default(name: str) -> Any:
    """A setting as a server started without ``LAMINA_*`` variables has it: admission in the
    benchmark refuses exactly what such a server refuses, unless the run says otherwise."""
    return LaminaSettings.model_fields[name].default


@dataclass(frozen=True)
class TaskTraining:
    """The per-task training knobs. Every method gets the same ones: methods differ only by
    their preset, so a difference in the table is the method's, not its tuning's."""

    steps: int
    learning_rate: float
    batch_size: int


# Chosen by measurement on the embedded model (bench/continual/README.md, "Per-task settings"):
# the fewest steps at which plain LoRA (rank 8, alpha 16) trained alone reaches its plateau on the
# test split, at a learning rate at which LoRI-S and LoRAF (B only, 10 % of it) learn the first
# three tasks too. `add` needs ~200 steps and a lower rate (5e-3 diverges) and peaks at ~50 %:
# the base model barely adds (9 % in its own "a + b =" wording). Tasks outside order 1 use
# DEFAULT_TRAINING, which was not tuned for them.
DEFAULT_TRAINING = TaskTraining(steps=60, learning_rate=5e-3, batch_size=16)
TASK_TRAINING: dict[str, TaskTraining] = {
    "topic": TaskTraining(steps=60, learning_rate=5e-3, batch_size=16),
    "sentiment": TaskTraining(steps=60, learning_rate=5e-3, batch_size=16),
    "capital": TaskTraining(steps=60, learning_rate=5e-3, batch_size=16),
    "add": TaskTraining(steps=200, learning_rate=3e-3, batch_size=16),
}


@dataclass(frozen=True)
class BenchmarkConfig:
    """One benchmark run. :meth:`quick` and :meth:`full` are the two documented presets."""

    order: int = 1
    methods: tuple[str, ...] = ALL_METHODS
    seeds: tuple[int, ...] = (0,)  # training seeds; the data split is fixed by data_seed
    n_tasks: int | None = None  # only the order's first n tasks (CI); None: all of them
    n_train: int = 200  # requested per task (small tasks return fewer)
    n_test: int = 50
    data_seed: int = 0
    steps: int | None = None  # override every task's steps (smoke runs)
    upper_bound: bool = True  # train every task alone too (needed for FWT)
    model_dir: Path = field(default_factory=default_base_model_dir)
    work_dir: Path | None = None  # where the stores go; None: a temporary directory, deleted after
    device: str = "auto"  # "auto": CUDA when available, else CPU
    threads: int | None = None  # torch.set_num_threads on CPU; None: leave torch's default
    eval_batch_size: int = 64
    training: str = "table"  # "table": TASK_TRAINING, the same for every method; "auto": trainer.auto's rules
    overrides: tuple[tuple[str, Any], ...] = ()  # hyper-parameters set for every task (a sweep's knob)
    probe: bool = True  # score the general-ability probe (trainer.suite.probe) after every task
    general: bool = True  # score the general-ability set (trainer.suite.general) after every task
    general_samples: int = 800  # base-sampled prompts in that set (plus its known-answer questions)
    general_questions: int | None = None  # at most this many candidate questions (tests); None: all
    # what depends on the base model alone (the general set, routing samples); None: <LAMINA_HOME>/cache
    cache: Path | None = None
    routing: str = "task"  # what `continual` serves per prompt (LAMINA_CONTINUAL_ROUTING): task | merge | off
    # Admission's limits, as LAMINA_MAX_LORA_RANK and LAMINA_LORAF_GROW_RANK set them for a server.
    # A concat merge of orders 4-6 (15 tasks of rank 8: 120) needs max_lora_rank 128.
    max_lora_rank: int = field(default_factory=lambda: server_default("max_lora_rank"))
    loraf_grow_rank: int = field(default_factory=lambda: server_default("loraf_grow_rank"))
    preset: str = "custom"

    @classmethod
    def quick(cls, **overrides: Any) -> BenchmarkConfig:
        """Seeds 0-2, 50 test examples per task: order 1 with every method in < 30 min on 2 CPU cores."""
        return cls(**{"preset": "quick", "seeds": (0, 1, 2), **overrides})

    @classmethod
    def full(cls, **overrides: Any) -> BenchmarkConfig:
        """Seeds 0-4 and 100 test examples per task, for a GPU machine (any order, 4 or 15 tasks)."""
        return cls(**{"preset": "full", "seeds": (0, 1, 2, 3, 4), "n_test": 100, **overrides})

    def __post_init__(self) -> None:
        for name in self.methods:
            resolve_method(name)  # UnknownMethodError names the choices
        get_order(self.order)
        if not self.methods or not self.seeds:
            raise ValueError("a benchmark needs at least one method and one seed")
        if self.training not in ("table", "auto"):
            raise ValueError(f"training must be 'table' or 'auto', got {self.training!r}")
        if self.max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {VLLM_LORA_RANKS}, got {self.max_lora_rank}")
        if self.routing not in ("merge", "task", "off"):
            raise ValueError(f"routing must be 'merge', 'task' or 'off', got {self.routing!r}")
        if self.loraf_grow_rank < 0:
            raise ValueError(f"loraf_grow_rank must be >= 0, got {self.loraf_grow_rank}")
        if self.n_tasks is not None and not 1 <= self.n_tasks <= len(get_order(self.order)):
            raise ValueError(f"n_tasks must be in 1..{len(get_order(self.order))}, got {self.n_tasks}")

    def cache_dir(self) -> Path:
        """Where what depends on the base model alone is kept (built once, reused by every run and
        by the worker: the general-ability set under ``general/``, routing samples under ``routing/``)."""
        return self.cache or LaminaSettings().cache_dir

    def task_names(self) -> tuple[str, ...]:
        return get_order(self.order)[: self.n_tasks]

    def task_training(self, task: str) -> TaskTraining:
        chosen = TASK_TRAINING.get(task, DEFAULT_TRAINING)
        return chosen if self.steps is None else replace(chosen, steps=self.steps)

    def hyperparameters(self, task: str, seed: int) -> Hyperparameters:
        """The task's Hyperparameters: rank 8 everywhere; steps, learning rate and batch size from
        the table, or left to ``trainer.auto`` (what a user who sets nothing gets)."""
        chosen: dict[str, Any] = {"r": RANK, "lora_alpha": LORA_ALPHA, "steps": self.steps, "seed": seed}
        if self.training == "table":
            knobs = self.task_training(task)
            chosen |= {
                "steps": knobs.steps,
                "learning_rate": knobs.learning_rate,
                "batch_size": knobs.batch_size,
            }
        return Hyperparameters(**(chosen | dict(self.overrides)))
