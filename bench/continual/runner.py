"""The continual benchmark's runner: train methods task after task and measure what they forget.

For each method (a preset of :mod:`trainer.config`) and seed, the runner walks one task order of
the suite (:mod:`trainer.suite`) exactly as the service does (below). After each task it loads the
store's *live merge* (what ``model="continual"`` serves), adds its ΔW to the base model's
weights and scores every task seen so far on its test split by greedy decoding. That fills the
accuracy matrix ``acc[i][j]`` (task ``j`` after training task ``i``, the convention of
:mod:`trainer.suite.metrics`), from which AA, BWT, FWT and FR follow.

Two references are measured once per run:

- *zero-shot*: the base model alone on every task (no adapter);
- *per-task upper bound*: every task trained alone on the base (``inc-lora``, empty history)
  and scored on its own test split — what a task can reach when nothing else shares the
  adapter. It is also FWT's "trained from scratch" accuracy (PS-LoRA A.2).

What ``continual`` serves is routed by input (:mod:`adapters_store.routing`, the server's
``LAMINA_CONTINUAL_ROUTING``; the config's ``routing``): each test prompt goes where the server
would send it — the live merge, the matching task's own model, or the base model itself — and
is scored on that model. General ability is measured the same way on the general-ability set
(:mod:`trainer.suite.general`: agreement with the base's greedy answers, KL from the base and
known-answer accuracy, each with its 95 % interval) after every task.

Nothing here trains or merges by itself: a method that the service runs differently would be
measured wrongly, so every number goes through the service's own code path.

Tasks train and publish through the worker's own function, :func:`trainer.publish.train_and_publish`:
admission with the config's ``max_lora_rank`` and ``loraf_grow_rank`` (a default server's unless
the run sets them; capacity refusals are the service's 409s), training on the store's live state,
then the publish (data hash, the method's ledger notes, inflora's subspace).
:mod:`bench.continual.writers` turns the result into markdown, JSON and a PNG.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapters_store.fingerprint import fingerprint_model
from adapters_store.lora import LoraAdapter
from adapters_store.routing import MERGE, PromptEmbedder, Router, RoutingMode, destination, router_from_metas
from adapters_store.store import AdapterStore
from bench import provenance
from bench.continual.config import UPPER_BOUND, UPPER_BOUND_METHOD, BenchmarkConfig
from bench.continual.results import BenchmarkResult, MethodRun, matrix_metrics
from trainer.chat import encode_prompt
from trainer.config import Example, resolve_method
from trainer.contract.admission import AdmissionError
from trainer.evaluate import greedy_completions
from trainer.loop import load_base, select_device
from trainer.methods.parametrizations import CapacityError
from trainer.publish import Hooks, train_and_publish
from trainer.routing import example_text
from trainer.served import merge_deltas, merged_into
from trainer.suite import Task, accuracy, get_task
from trainer.suite.general import GeneralScore, GeneralSet, Interval, load_or_build, score_general, wilson
from trainer.suite.probe import answered as probe_answered
from trainer.suite.probe import build_probe

log = logging.getLogger(__name__)
CAPACITY_CODES = ("capacity_exceeded", "rank_exceeded")  # admission's refusals for a full store


class NoCapacity(Exception):
    """Admission refused the task: the store has no room left for it (the service's 409)."""


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
    embedder: PromptEmbedder | None = None  # the routing signal (the base's input embeddings)
    probe: list[Example] = field(default_factory=list)  # what the base model knows (trainer.suite.probe)
    general: GeneralSet | None = None  # the general-ability set (trainer.suite.general)
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


def routing_targets(ctx: _Context, served: _Served, router: Router, texts: Sequence[str]) -> list[str | None]:
    """Where the server would send each prompt of a ``continual`` request
    (:func:`adapters_store.routing.destination`): MERGE, a task's name or None (the base itself)."""
    mode = cast(RoutingMode, ctx.config.routing)
    if mode == "off":
        return [MERGE] * len(texts)
    assert ctx.embedder is not None
    if not router.prototypes:
        return [None] * len(texts)
    decisions = router.decide(ctx.embedder.embed(list(texts)))
    return [destination(d, mode, served.tasks_exact) for d in decisions]


class _Served:
    """The ΔW of each model a routed prompt can land on, loaded once per evaluation round."""

    def __init__(self, store: AdapterStore) -> None:
        self.store = store
        # As the default server (LAMINA_CONTINUAL_SERVING=auto: lora under task routing) serves them:
        # every task's own model exactly, whatever kind of merge is live.
        self.tasks_exact = True
        self._deltas: dict[str | None, dict[str, torch.Tensor]] = {None: {}}

    def deltas(self, target: str | None) -> dict[str, torch.Tensor]:
        if target not in self._deltas:
            if target == MERGE:
                self._deltas[target] = live_deltas(self.store)
            else:  # a task's own model, as ``model=<task>`` serves it
                record = next(t for t in self.store.tasks() if t.name == target)
                self._deltas[target] = LoraAdapter.load_peft(record.serving_path).deltas()
        return self._deltas[target]


def _groups(targets: Sequence[str | None]) -> dict[str | None, list[int]]:
    groups: dict[str | None, list[int]] = {}
    for index, target in enumerate(targets):
        groups.setdefault(target, []).append(index)
    return groups


def evaluate_routed(ctx: _Context, served: _Served, router: Router, task_index: int) -> float:
    """A task's test accuracy on ``continual`` as routed: each prompt scored on the model it lands on."""
    task, test = ctx.suite.tasks[task_index], ctx.suite.test[task_index]
    predictions = [""] * len(test)
    for target, indices in _groups(
        routing_targets(ctx, served, router, [example_text(e) for e in test])
    ).items():
        prompts = [encode_prompt(ctx.tokenizer, test[k].prompt) for k in indices]
        with merged_into(ctx.model, served.deltas(target)):
            outputs = greedy_completions(
                ctx.model, ctx.tokenizer, prompts, task.max_new_tokens, ctx.config.eval_batch_size
            )
        for k, output in zip(indices, outputs, strict=True):
            predictions[k] = output
    return accuracy(predictions, test)


def general_routed(ctx: _Context, served: _Served, router: Router) -> GeneralScore | None:
    """The general-ability scores of ``continual`` as routed: prompts sent to the base are the
    base's own answers (not run); each other group is scored on the model it lands on."""
    if ctx.general is None:
        return None
    targets = routing_targets(ctx, served, router, ctx.general.prompts)
    scores = []
    for target, indices in _groups(targets).items():
        if target is None:
            continue
        chosen = set(indices)
        to_base = [k not in chosen for k in range(len(targets))]
        with merged_into(ctx.model, served.deltas(target)):
            scores.append(score_general(ctx.model, ctx.tokenizer, ctx.general, to_base=to_base))
    if not scores:
        return score_general(ctx.model, ctx.tokenizer, ctx.general, to_base=[True] * len(targets))
    return combine_scores(scores)


def combine_scores(scores: Sequence[GeneralScore]) -> GeneralScore:
    """One score from several groups' scores, each taken with every prompt outside its group
    counted as the base's own answer: their disagreements, misses and KL add up."""
    first = scores[0]
    n, n_questions = first.agreement.n, first.accuracy.n
    disagree = sum(round((1 - s.agreement.value) * n) for s in scores)
    missed = sum(round((1 - s.accuracy.value) * n_questions) for s in scores)
    kl = sum(s.kl.value for s in scores)
    half = sum((s.kl.high - s.kl.low) / 2 for s in scores)  # conservative: the groups' widths add
    return GeneralScore(
        agreement=wilson(n - disagree, n),
        kl=Interval(kl, max(kl - half, 0.0), kl + half, first.kl.n),
        accuracy=wilson(n_questions - missed, n_questions),
        base_accuracy=first.base_accuracy,
    )


def live_router(store: AdapterStore) -> Router:
    """The router a server builds from the store's live tasks (their prototypes in meta)."""
    return router_from_metas({t.name: t.meta for t in store.tasks()})


def add_task(
    ctx: _Context, store: AdapterStore, method_name: str, task_index: int, seed: int, label: str
) -> tuple[float, dict[str, Any]]:
    """Admit one task to the store, train it on the store's live state and publish it, through
    the worker's own :func:`trainer.publish.train_and_publish` with the config's admission limits.

    Returns (seconds spent, the training's metrics); raises :class:`NoCapacity` when admission
    refuses the task for want of room (the service's 409).
    """
    task = ctx.suite.tasks[task_index]
    ctx.progress.stage(ctx.trainings_done, ctx.trainings_total, label)
    started = time.perf_counter()
    try:
        trained, _ = train_and_publish(
            store,
            task.name,
            ctx.suite.train[task_index],
            resolve_method(method_name),
            ctx.config.hyperparameters(task.name, seed),
            lambda: (ctx.model, ctx.tokenizer),
            max_lora_rank=ctx.config.max_lora_rank,
            loraf_grow_rank=ctx.config.loraf_grow_rank,
            hooks=Hooks(progress=ctx.progress.step),
            extra_meta={"benchmark": {"order": ctx.config.order, "seed": seed}},
            cache_dir=ctx.config.cache_dir(),
        )
    except AdmissionError as error:
        if error.code in CAPACITY_CODES:
            raise NoCapacity(error.message) from error
        raise
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
    general: list[dict[str, Any]] = []
    for i, task in enumerate(ctx.suite.tasks):
        try:
            seconds, trained = add_task(
                ctx, store, method, i, seed, f"{method} s{seed} {i + 1}/{size} {task.name}"
            )
        except (NoCapacity, CapacityError) as error:
            log.warning("%s seed %d: task %d (%s) refused: %s", method, seed, i, task.name, error)
            refused.append(i)
            ctx.trainings_done += 1
        else:
            train_seconds += seconds
            losses.append(float(trained["final_loss"]))
            if "subspace_reserved_max" in trained:  # inflora: how full the fullest module is now
                reserved.append(float(trained["subspace_reserved_max"]))
        started = time.perf_counter()
        served, router = _Served(store), live_router(store)
        for j in range(min(i + 2, size)):
            acc[i][j] = evaluate_routed(ctx, served, router, j)
        if ctx.probe:
            probe.append(probe_routed(ctx, served, router))
        score = general_routed(ctx, served, router)
        if score is not None:
            general.append(score.to_dict())
        eval_seconds += time.perf_counter() - started
    metrics = matrix_metrics(acc, scratch, zero_shot)
    metrics["GA"] = probe[-1] if probe else None
    metrics.update(general_metrics(general[-1] if general else None))
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
        general,
    )


def probe_routed(ctx: _Context, served: _Served, router: Router) -> float | None:
    """Share of the probe ``continual`` still answers, each question on the model it is routed to."""
    if not ctx.probe:
        return None
    answered = 0
    for target, indices in _groups(
        routing_targets(ctx, served, router, [q.prompt for q in ctx.probe])
    ).items():
        with merged_into(ctx.model, served.deltas(target)):
            answered += sum(probe_answered(ctx.model, ctx.tokenizer, [ctx.probe[k] for k in indices]))
    return answered / len(ctx.probe)


def general_metrics(score: dict[str, Any] | None) -> dict[str, float | None]:
    """The general-ability columns of the summary: agreement, KL and known-answer accuracy."""
    if score is None:
        return {"GA_agree": None, "GA_kl": None, "GA_known": None}
    return {
        "GA_agree": score["agreement"]["value"],
        "GA_kl": score["kl"]["value"],
        "GA_known": score["accuracy"]["value"],
    }


def run_upper_bound(ctx: _Context, seed: int) -> list[float]:
    """Each task trained alone on the base (``inc-lora`` into an empty store) and scored on itself."""
    scores = []
    for i, task in enumerate(ctx.suite.tasks):
        store = ctx.new_store(f"{UPPER_BOUND}-{task.name}-seed{seed}")
        add_task(ctx, store, UPPER_BOUND_METHOD, i, seed, f"{UPPER_BOUND} s{seed} {task.name}")
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
    load_at_start = provenance.load_average()
    commit = provenance.commit_label()  # the code that runs is the code at the start
    device = select_device(config.device)  # the worker's rule: auto is CUDA when torch sees one
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
        ctx.embedder = PromptEmbedder.from_model(ctx.model, ctx.tokenizer)
        if config.probe:
            ctx.probe = build_probe(ctx.model, ctx.tokenizer)
        if config.general:
            ctx.general = load_or_build(
                config.cache_dir() / "general",
                fingerprint,
                ctx.model,
                ctx.tokenizer,
                n_sampled=config.general_samples,
                max_questions=config.general_questions,
            )
        upper: dict[int, list[float]] = {}
        runs: list[MethodRun] = []
        for seed in config.seeds:
            if config.upper_bound:
                upper[seed] = run_upper_bound(ctx, seed)
            for method in config.methods:
                runs.append(run_method(ctx, method, seed, upper.get(seed), zero_shot))
        machine = provenance.machine(str(device))  # inside the block: the threads the run used
        machine["load_average_at_start"] = load_at_start

    machine["load_average_at_end"] = provenance.load_average()
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
        general_size=_general_size(ctx.general),
    )


def _general_size(general: GeneralSet | None) -> dict[str, int]:
    if general is None:
        return {}
    return {"prompts": len(general.prompts), "questions": len(general.questions)}


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
