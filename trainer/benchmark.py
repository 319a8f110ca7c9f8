"""``lamina bench continual``: train methods task after task and measure what they forget.

For each method (a preset of :mod:`trainer.config`) and seed, the runner walks one task order of
the suite (:mod:`trainer.suite`) exactly as the service does: ``train_task`` on the store's
history, then ``AdapterStore.publish`` with the method's merge. After each task it loads the
store's *live merge* (what ``model="continual"`` serves), adds its ΔW to the base model's
weights and scores every task seen so far on its test split by greedy decoding. That fills the
accuracy matrix ``acc[i][j]`` (task ``j`` after training task ``i``, the convention of
:mod:`trainer.suite.metrics`), from which AA, BWT, FWT and FR follow.

Two references are measured once per run:

- *zero-shot*: the base model alone on every task (no adapter);
- *per-task upper bound*: every task trained alone on the base (``inc-lora``, empty history)
  and scored on its own test split — what a task can reach when nothing else shares the
  adapter. It is also FWT's "trained from scratch" accuracy (PS-LoRA A.2).

Nothing here trains or merges by itself: a method that the service runs differently would be
measured wrongly, so every number goes through the service's own code path.

Writers turn a :class:`BenchmarkResult` into a markdown table, a JSON file (machine, date,
commit, configuration, every matrix) and a PNG of the accuracy after each task per method
(the shape of PS-LoRA's Fig. 7).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapters_store.fingerprint import fingerprint_model
from adapters_store.store import AdapterStore
from trainer.chat import encode_prompt
from trainer.config import PRESETS, Example, Hyperparameters, resolve_method
from trainer.evaluate import greedy_completions
from trainer.loop import load_base
from trainer.methods import CapacityError
from trainer.publish import publish_trained, train_for_store
from trainer.served import merge_deltas, merged_into
from trainer.settings import default_base_model_dir
from trainer.suite import Task, accuracy, get_order, get_task
from trainer.suite.metrics import (
    AccuracyMatrix,
    average_accuracy,
    backward_transfer,
    forgetting_rate,
    forward_transfer,
    seen_task_accuracy,
)
from trainer.suite.probe import build_probe, probe_accuracy

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
UPPER_BOUND = "per-task"  # the row of tasks trained alone; not a method of the store
UPPER_BOUND_METHOD = "inc-lora"  # trained with an empty history, so: plain LoRA on the base
ALL_METHODS: tuple[str, ...] = tuple(PRESETS)  # the catalogue's presets, baselines first
METRIC_NAMES: tuple[str, ...] = ("AA", "BWT", "FWT", "FWT0", "FR", "GA", "ACR", "occupancy")
RANK = 8  # every task, every method (the setting)
LORA_ALPHA = 16
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*")  # overlapping curves stay tellable


# ---------------------------------------------------------------------------------------------
# Configuration.


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
        if self.n_tasks is not None and not 1 <= self.n_tasks <= len(get_order(self.order)):
            raise ValueError(f"n_tasks must be in 1..{len(get_order(self.order))}, got {self.n_tasks}")

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


# ---------------------------------------------------------------------------------------------
# Results.


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


class Progress(Protocol):
    """What the runner reports while it works (the CLI draws tqdm bars from it)."""

    def stage(self, done: int, total: int, label: str) -> None:
        """A training run starts; ``done`` of ``total`` trainings are finished."""

    def step(self, step: int, total: int, loss: float) -> None:
        """The current training reached ``step`` of ``total`` with this task loss."""


class _Silent:
    """The default :class:`Progress`: library callers and tests want no output."""

    def stage(self, done: int, total: int, label: str) -> None:
        pass

    def step(self, step: int, total: int, loss: float) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Metrics from a matrix.


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


# ---------------------------------------------------------------------------------------------
# Evaluation: greedy decoding on W0 + ΔW.


def evaluate_task(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    test: Sequence[Example],
    batch_size: int,
) -> float:
    """Exact-match accuracy of greedy decoding on one task's test split (the suite's ``score``)."""
    prompts = [encode_prompt(tokenizer, e.prompt) for e in test]
    predictions = greedy_completions(model, tokenizer, prompts, task.max_new_tokens, batch_size)
    return accuracy(predictions, test)


# ---------------------------------------------------------------------------------------------
# The runner.


@dataclass
class _Suite:
    """The order's tasks with their fixed splits, converted for the trainer once."""

    tasks: list[Task]
    train: list[list[Example]]
    test: list[list[Example]]


def load_suite(config: BenchmarkConfig) -> _Suite:
    """The order's tasks and their deterministic splits."""
    tasks = [get_task(name) for name in config.task_names()]
    train, test = [], []
    for task in tasks:
        task_train, task_test = task.split(
            seed=config.data_seed, n_train=config.n_train, n_test=config.n_test
        )
        train.append(task_train)
        test.append(task_test)
    return _Suite(tasks, train, test)


@dataclass
class _Context:
    """What every stage needs: the loaded model, the suite, where stores go, how to report."""

    config: BenchmarkConfig
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str
    suite: _Suite
    stores: Path
    progress: Progress
    probe: list[Example] = field(default_factory=list)  # what the base model knows (trainer.suite.probe)
    trainings_done: int = 0
    trainings_total: int = 0

    def evaluate(self, task_index: int) -> float:
        return evaluate_task(
            self.model,
            self.tokenizer,
            self.suite.tasks[task_index],
            self.suite.test[task_index],
            self.config.eval_batch_size,
        )

    def new_store(self, label: str) -> AdapterStore:
        root = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=self.stores))
        return AdapterStore(root, self.fingerprint, base_model=str(self.config.model_dir))


def train_and_publish(
    ctx: _Context, store: AdapterStore, method_name: str, task_index: int, seed: int, label: str
) -> tuple[float, dict[str, Any]]:
    """Train one task on the store's live state and publish it through the worker's own path
    (:mod:`trainer.publish`).

    Returns (seconds spent, the training's metrics).
    """
    method = resolve_method(method_name)
    task = ctx.suite.tasks[task_index]
    hp = ctx.config.hyperparameters(task.name, seed)
    ctx.progress.stage(ctx.trainings_done, ctx.trainings_total, label)
    started = time.perf_counter()
    examples = ctx.suite.train[task_index]
    trained = train_for_store(
        ctx.model, ctx.tokenizer, store, examples, method, hp, progress=ctx.progress.step
    )
    extra = {"benchmark": {"order": ctx.config.order, "seed": seed}}
    publish_trained(store, task.name, examples, method, hp, trained, extra_meta=extra)
    ctx.trainings_done += 1
    return time.perf_counter() - started, trained.result.metrics


def live_deltas(store: AdapterStore) -> dict[str, torch.Tensor]:
    """ΔW of what the store serves as ``continual`` right now."""
    live = store.live()
    return merge_deltas(store.load_merge(live.id) if live is not None else None)


def run_method(
    ctx: _Context, method: str, seed: int, scratch: list[float] | None, zero_shot: list[float]
) -> MethodRun:
    """Train the order's tasks one after another with ``method``; evaluate after each.

    After task i: every seen task j <= i (the matrix's lower triangle) and the next task i + 1
    (for FWT0) are scored on the live merge. A task the store has no capacity for (LoRAF's B,
    inflora's input directions) is refused, as the service refuses it with 409: the live merge
    stays as it was and the task is scored on it all the same.
    """
    size = len(ctx.suite.tasks)
    acc: list[list[float | None]] = [[None] * size for _ in range(size)]
    store = ctx.new_store(f"{method}-seed{seed}")
    train_seconds = eval_seconds = 0.0
    losses: list[float] = []
    probe: list[float | None] = []
    reserved: list[float] = []
    refused: list[int] = []
    for i, task in enumerate(ctx.suite.tasks):
        try:
            seconds, trained = train_and_publish(
                ctx, store, method, i, seed, f"{method} s{seed} {i + 1}/{size} {task.name}"
            )
        except CapacityError as error:
            log.warning("%s seed %d: task %d (%s) refused: %s", method, seed, i, task.name, error)
            refused.append(i)
            ctx.trainings_done += 1
        else:
            train_seconds += seconds
            losses.append(float(trained["final_loss"]))
            if "subspace_reserved_max" in trained:  # inflora: how full the fullest module is now
                reserved.append(float(trained["subspace_reserved_max"]))
        started = time.perf_counter()
        with merged_into(ctx.model, live_deltas(store)):
            for j in range(min(i + 2, size)):
                acc[i][j] = ctx.evaluate(j)
            if ctx.probe:
                probe.append(probe_accuracy(ctx.model, ctx.tokenizer, ctx.probe))
        eval_seconds += time.perf_counter() - started
    metrics = matrix_metrics(acc, scratch, zero_shot)
    metrics["GA"] = probe[-1] if probe else None
    store_stats, stats_error = store_statistics(store)
    metrics.update(store_stats)
    return MethodRun(
        method,
        seed,
        acc,
        metrics,
        round(train_seconds, 2),
        round(eval_seconds, 2),
        losses,
        stats_error,
        probe,
        reserved,
        refused,
    )


def run_upper_bound(ctx: _Context, seed: int) -> list[float]:
    """Each task trained alone on the base (``inc-lora`` into an empty store) and scored on itself."""
    scores = []
    for i, task in enumerate(ctx.suite.tasks):
        store = ctx.new_store(f"{UPPER_BOUND}-{task.name}-seed{seed}")
        train_and_publish(ctx, store, UPPER_BOUND_METHOD, i, seed, f"{UPPER_BOUND} s{seed} {task.name}")
        with merged_into(ctx.model, live_deltas(store)):
            scores.append(ctx.evaluate(i))
    return scores


def store_statistics(store: AdapterStore) -> tuple[dict[str, float | None], str | None]:
    """ACR (N-LoRA eq. 10, in ΔW space) and occupancy of the store's live task adapters, from
    ``adapters_store.stats`` — the admin view's numbers, not a second implementation of them.

    Returns the two values (None when the stats module is missing or fails) and the reason they
    are missing, so a long run still ends with its accuracies and says why a column is empty.
    """
    missing: dict[str, float | None] = {"ACR": None, "occupancy": None}
    try:
        from adapters_store.stats import compute_stats
    except ImportError as error:
        return missing, f"adapters_store.stats unavailable: {error}"
    try:
        report = compute_stats(store.history(), [t.id for t in store.tasks()]).to_dict()["aggregate"]
    except Exception as error:  # a stats bug must not throw away a finished run's accuracies
        log.warning("stats of %s failed: %s", store.root, error)
        return missing, f"adapters_store.stats failed: {type(error).__name__}: {error}"
    return {"ACR": report.get("acr_dw"), "occupancy": report.get("occupancy")}, None


def run_benchmark(config: BenchmarkConfig, progress: Progress | None = None) -> BenchmarkResult:
    """Run ``config``: zero-shot, the per-task upper bound, then every method × seed."""
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    started = time.perf_counter()
    load_at_start = _load_average()
    commit = git_commit()  # the code that runs is the code at the start
    device = _device(config.device)
    model, tokenizer = load_base(config.model_dir)
    cast(nn.Module, model).to(device)
    suite = load_suite(config)
    size = len(suite.tasks)
    per_seed = len(config.methods) * size + (size if config.upper_bound else 0)

    fingerprint = fingerprint_model(config.model_dir)
    with _torch_threads(config.threads), _stores_dir(config.work_dir) as stores:
        ctx = _Context(
            config=config,
            model=model,
            tokenizer=tokenizer,
            fingerprint=fingerprint,
            suite=suite,
            stores=stores,
            progress=progress or _Silent(),
            trainings_total=per_seed * len(config.seeds),
        )
        zero_shot = [ctx.evaluate(i) for i in range(size)]
        if config.probe:
            ctx.probe = build_probe(ctx.model, ctx.tokenizer)
        upper: dict[int, list[float]] = {}
        runs: list[MethodRun] = []
        for seed in config.seeds:
            if config.upper_bound:
                upper[seed] = run_upper_bound(ctx, seed)
            for method in config.methods:
                runs.append(run_method(ctx, method, seed, upper.get(seed), zero_shot))
        machine = machine_info(device)  # inside the block: the threads the run used

    machine["load_average_1min"] = {"start": load_at_start, "end": _load_average()}
    return BenchmarkResult(
        config=config,
        tasks=[t.name for t in suite.tasks],
        test_sizes=[len(t) for t in suite.test],
        zero_shot=zero_shot,
        upper_bound=upper,
        runs=runs,
        machine=machine,
        started_at=started_at,
        wall_seconds=round(time.perf_counter() - started, 1),
        git_commit=commit,
        base_fingerprint=fingerprint,
        probe_size=len(ctx.probe),
    )


def _device(name: str) -> torch.device:
    """``auto``: the GPU when there is one (the full configuration), else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Use ``threads`` CPU threads inside the block and restore torch's setting after it: the
    process-wide setting is the caller's (a test session, a worker), not the benchmark's."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _stores_dir(work_dir: Path | None) -> Iterator[Path]:
    """``work_dir`` (kept, for inspection) or a temporary directory (deleted afterwards)."""
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
        yield work_dir
        return
    with tempfile.TemporaryDirectory(prefix="lamina-bench-") as tmp:
        yield Path(tmp)


# ---------------------------------------------------------------------------------------------
# Provenance.


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores and threads, torch version and the GPU, if one ran the benchmark."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _load_average() -> float | None:
    """1-minute load average: on a shared machine, wall times mean little without it."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what the platform module reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """HEAD of the repository, with ``+dirty`` when tracked files have changes (untracked files are
    not seen); None outside git."""
    try:
        head = _git("rev-parse", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{head}+dirty" if dirty else head


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO_ROOT, check=True, capture_output=True, text=True, timeout=10
    ).stdout.strip()


# ---------------------------------------------------------------------------------------------
# Writers.


def result_to_dict(result: BenchmarkResult) -> dict[str, Any]:
    """The JSON document: provenance, configuration, per-task settings, every matrix, the summary."""
    config = asdict(result.config)
    config["model_dir"] = str(result.config.model_dir)
    config["work_dir"] = None if result.config.work_dir is None else str(result.config.work_dir)
    return {
        "benchmark": "continual",
        "started_at": result.started_at,
        "wall_seconds": result.wall_seconds,
        "git_commit": result.git_commit,
        "base_model": {"path": str(result.config.model_dir), "fingerprint": result.base_fingerprint},
        "machine": result.machine,
        "config": config,
        "task_training": {
            t: {
                **(asdict(result.config.task_training(t)) if result.config.training == "table" else {}),
                "training": result.config.training,
                "r": RANK,
                "lora_alpha": LORA_ALPHA,
            }
            for t in result.tasks
        },
        "tasks": result.tasks,
        "test_sizes": result.test_sizes,
        "zero_shot": result.zero_shot,
        "probe_size": result.probe_size,
        "upper_bound": {str(seed): scores for seed, scores in result.upper_bound.items()},
        "summary": result.summary(),
        "runs": [asdict(run) for run in result.runs],
        "matrix_convention": "accuracy[i][j]: test accuracy on task j after training task i (0-based); "
        "entries j = i + 1 are the next task before it is trained (for FWT0); null: not measured",
    }


def write_json(result: BenchmarkResult, path: Path) -> Path:
    path.write_text(json.dumps(result_to_dict(result), indent=2, allow_nan=False) + "\n")
    return path


def load_result(path: Path) -> BenchmarkResult:
    """Read a result back from its JSON, e.g. to redraw the table or the PNG without retraining
    (the summary is recomputed from the runs; the JSON's copy is only for readers)."""
    document = json.loads(path.read_text())
    config = dict(document["config"])
    config["methods"], config["seeds"] = tuple(config["methods"]), tuple(config["seeds"])
    config["model_dir"] = Path(config["model_dir"])
    config["work_dir"] = None if config["work_dir"] is None else Path(config["work_dir"])
    config["overrides"] = tuple(tuple(pair) for pair in config.get("overrides", ()))
    return BenchmarkResult(
        config=BenchmarkConfig(**config),
        tasks=document["tasks"],
        test_sizes=document["test_sizes"],
        zero_shot=document["zero_shot"],
        upper_bound={int(seed): scores for seed, scores in document["upper_bound"].items()},
        runs=[MethodRun(**run) for run in document["runs"]],
        machine=document["machine"],
        started_at=document["started_at"],
        wall_seconds=document["wall_seconds"],
        git_commit=document["git_commit"],
        base_fingerprint=document["base_model"]["fingerprint"],
        probe_size=document.get("probe_size", 0),
    )


def _fmt(value: float | None, percent: bool = True, std: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = f"{100 * value:.1f}" if percent else f"{value:.3f}"
    if std is not None:
        text += f" ± {100 * std:.1f}" if percent else f" ± {std:.3f}"
    return text


def markdown_table(result: BenchmarkResult) -> str:
    """The summary table: one row per method (mean over seeds), then the per-task references."""
    summary = result.summary()
    lines = [
        "| method | AA ↑ | BWT ↑ | FWT ↑ | FWT0 ↑ | FR ↓ | GA ↑ | ACR | occupancy | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method in result.config.methods:
        row = summary[method]
        seconds = statistics.fmean(r.train_seconds for r in result.runs_of(method))
        cells = [_fmt(row[m], std=row[f"{m}_std"]) for m in ("AA", "BWT", "FWT", "FWT0", "FR", "GA")]
        cells += [_fmt(row[m], percent=False, std=row[f"{m}_std"]) for m in ("ACR", "occupancy")]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    upper = result.upper_bound_mean()
    if upper is not None:
        lines.append(
            f"| {UPPER_BOUND} (upper bound) | {_fmt(statistics.fmean(upper))} | – | – | – | – | – | – | – | – |"
        )
    lines.append(
        f"| zero-shot (base) | {_fmt(statistics.fmean(result.zero_shot))} | – | – | – | – | – | – | – | – |"
    )
    return "\n".join(lines)


def final_accuracy_table(result: BenchmarkResult) -> str:
    """Accuracy on each task after the last one (the matrix's last row), per method."""
    header = "| method | " + " | ".join(result.tasks) + " |"
    lines = [header, "|---|" + "---:|" * len(result.tasks)]
    for method in result.config.methods:
        last = result.mean_matrix(method)[-1]
        lines.append(f"| {method} | " + " | ".join(_fmt(v) for v in last) + " |")
    upper = result.upper_bound_mean()
    if upper is not None:
        lines.append(f"| {UPPER_BOUND} | " + " | ".join(_fmt(v) for v in upper) + " |")
    lines.append("| zero-shot | " + " | ".join(_fmt(v) for v in result.zero_shot) + " |")
    return "\n".join(lines)


def matrix_table(result: BenchmarkResult, method: str) -> str:
    """One method's mean matrix: a row per stage (after training task i), a column per task."""
    lines = ["| after \\ on | " + " | ".join(result.tasks) + " |", "|---|" + "---:|" * len(result.tasks)]
    for i, row in enumerate(result.mean_matrix(method)):
        cells = [("" if j > i + 1 else _fmt(v)) for j, v in enumerate(row)]
        cells = [f"({c})" if j == i + 1 and c not in ("", "–") else c for j, c in enumerate(cells)]
        lines.append(f"| {result.tasks[i]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(result: BenchmarkResult) -> str:
    """The whole markdown file: setting, summary table, final accuracies, every matrix."""
    config, machine = result.config, result.machine
    seeds = ", ".join(str(s) for s in config.seeds)
    parts = [
        f"# Continual benchmark: order {config.order} ({config.preset})",
        "",
        f"Tasks in order: {', '.join(result.tasks)}; test examples per task: "
        f"{', '.join(map(str, result.test_sizes))}; seeds: {seeds}. "
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch threads {machine['torch_threads']}, "
        f"device {machine['device']}{' (' + machine['gpu'] + ')' if 'gpu' in machine else ''}. "
        f"Wall time {result.wall_seconds / 60:.1f} min{_load_note(machine)}. "
        f"Commit {result.git_commit}; base model fingerprint "
        f"{result.base_fingerprint}. Started {result.started_at}.",
        "",
        'Accuracies in %, exact match, greedy decoding on the live merge (`model="continual"`). '
        "AA: mean final accuracy (N-LoRA eq. 5). BWT: mean a_final − a_just-learned (PS-LoRA A.2). "
        "FWT: mean a_just-learned − a_trained-alone, tasks 2..T (PS-LoRA A.2 as its Table 2 computes it). "
        "FWT0: mean a_before-training − a_zero-shot, tasks 2..T (A.2's literal a_{i,i−1}; GEM's FWT). "
        "FR: mean drop from the best to the final accuracy (N-LoRA eq. 6). "
        f"GA: share of the general-ability probe ({result.probe_size} questions the base model answers; "
        "trainer/suite/probe.py) that the live merge still answers after the last task. "
        "ACR (N-LoRA eq. 10) and occupancy (share of B positions owned) from `adapters_store.stats` "
        "on the live task adapters after the last task; – where not available. "
        "With several seeds: mean ± sample standard deviation over seeds.",
        "",
        markdown_table(result),
        "",
        "## Final accuracy per task",
        "",
        final_accuracy_table(result),
        "",
        "## Accuracy matrices",
        "",
        "Row: after training that task; column: the task scored. In parentheses: the next task, "
        "before it is trained.",
    ]
    for method in config.methods:
        parts += ["", f"### {method}", "", matrix_table(result, method)]
        reserved = [run.subspace_reserved for run in result.runs_of(method) if run.subspace_reserved]
        if reserved:  # inflora's capacity: the fullest module's reserved share of its inputs
            means = [statistics.fmean(values) for values in zip(*reserved, strict=False)]
            shares = ", ".join(f"{100 * share:.0f} %" for share in means)
            parts += ["", f"Input directions reserved in the fullest module after each task: {shares}."]
        for run in result.runs_of(method):
            if run.refused:
                names = ", ".join(result.tasks[i] for i in run.refused)
                parts += [
                    "",
                    f"Seed {run.seed}: no capacity left for {names} (refused, as the service would).",
                ]
    return "\n".join(parts) + "\n"


def _load_note(machine: dict[str, Any]) -> str:
    load = machine.get("load_average_1min") or {}
    if load.get("start") is None:
        return ""
    return f" (1-min load average {load['start']} at start, {load['end']} at end)"


def write_markdown(result: BenchmarkResult, path: Path) -> Path:
    path.write_text(markdown_report(result))
    return path


def write_png(result: BenchmarkResult, path: Path) -> Path:
    """Two panels: (a) mean accuracy over the tasks seen so far after each task, per method,
    with the upper bound dashed (PS-LoRA Fig. 7's curves); (b) the first task's accuracy after
    each task — forgetting made visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(range(1, len(result.tasks) + 1))
    labels = [f"{i}\n{name}" for i, name in zip(stages, result.tasks, strict=True)]
    figure, (seen_axis, first_axis) = plt.subplots(1, 2, figsize=(12, 4.6), constrained_layout=True)
    for index, method in enumerate(result.config.methods):
        matrix = result.mean_matrix(method)
        style = {"marker": _MARKERS[index % len(_MARKERS)], "label": method, "alpha": 0.85}
        seen_axis.plot(stages, [100 * v for v in seen_task_accuracy(matrix)], **style)
        first_axis.plot(stages, [100 * (row[0] or 0.0) for row in matrix], **style)
    upper = result.upper_bound_mean()
    if upper is not None:
        running = [100 * statistics.fmean(upper[: i + 1]) for i in range(len(upper))]
        seen_axis.plot(stages, running, "k--", label=f"{UPPER_BOUND} (upper bound)")
        first_axis.axhline(100 * upper[0], color="k", linestyle="--")
    first_axis.axhline(100 * result.zero_shot[0], color="gray", linestyle=":")
    seen_axis.set_title("(a) mean accuracy on the tasks seen so far")
    first_axis.set_title(f"(b) accuracy on the first task ({result.tasks[0]}); dotted: zero-shot")
    for axis in (seen_axis, first_axis):
        axis.set_xticks(stages, labels)
        axis.set_xlabel("after training task")
        axis.set_ylabel("accuracy (%)")
        axis.set_ylim(-3, 103)
        axis.grid(alpha=0.3)
    seen_axis.legend(fontsize=8, loc="lower left")
    figure.suptitle(f"Continual benchmark, order {result.config.order} ({result.config.preset})")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_all(result: BenchmarkResult, out_dir: Path) -> dict[str, Path]:
    """``continual-order<N>.{md,json,png}`` in ``out_dir``; returns the paths by suffix."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"continual-order{result.config.order}"
    return {
        "md": write_markdown(result, stem.with_suffix(".md")),
        "json": write_json(result, stem.with_suffix(".json")),
        "png": write_png(result, stem.with_suffix(".png")),
    }
