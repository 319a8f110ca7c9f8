"""Admit one task to a store, train it on the store's live state and publish it: the one path
(:func:`train_and_publish`) the worker and the benchmark share.

Anything that decides what a published task *is* lives here once — admission and the
hyper-parameters it settles, which history and subspace it trains on, the subspace it adds
(inflora), the served view of its own model, what its meta records — so the benchmark measures
exactly what the service serves.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapters_store.atomic import write_atomically
from adapters_store.evaluation import latest_general
from adapters_store.interface import Fence
from adapters_store.lora import LoraAdapter
from adapters_store.merges import build_merge
from adapters_store.routing import MERGE, RoutePrototype, RoutingMode
from adapters_store.store import AdapterStore, Publication
from adapters_store.subspace import Subspace, occupancy
from trainer import regression
from trainer.config import ChatExample, Hyperparameters, MethodSpec, TrainingExample
from trainer.contract.admission import admit
from trainer.loop import TrainResult, train_task
from trainer.methods import catalog
from trainer.methods.registry import PARAMETRIZATIONS
from trainer.routing import fit_task_prototype
from trainer.served import merge_deltas
from trainer.subspace_growth import base_subspace, grow_subspace, target_names
from trainer.suite.general import GeneralSet, load_or_build

BASE_MIN_FREE_TASKS = 4  # the base model's seed leaves every module room for this many tasks


@dataclass
class TrainedTask:
    """A trained task not yet published: its adapter and metrics, and the subspace it grows."""

    result: TrainResult
    history: list[LoraAdapter]  # the live tasks it was trained after, oldest first
    subspace: Subspace | None  # the protected subspace once it is live (inflora), else None
    routing: RoutePrototype | None = None  # which prompts `continual` answers with the merge for it
    trained_on: tuple[str, ...] | None = None  # the live task ids it trained after: the publish's fence
    merge_part: LoraAdapter | None = None  # what the merge gets when not the adapter itself (own-lora)

    @property
    def for_merge(self) -> LoraAdapter:
        """The adapter the store's merges are built from (and later tasks train after)."""
        return self.merge_part if self.merge_part is not None else self.result.adapter

    @property
    def hyperparameters(self) -> Hyperparameters:
        """As trained: every "auto" value resolved."""
        assert self.result.hyperparameters is not None
        return self.result.hyperparameters


ModelLoader = Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerBase]]


def _nothing() -> None:
    """The default :attr:`Hooks.on_admitted`: a caller with nothing to record."""


def _no_fence() -> Fence | None:
    """The default :attr:`Hooks.before_publish`: publish unconditionally, with no claim to check."""
    return None


@dataclass(frozen=True)
class Hooks:
    """What a caller does between the steps of :func:`train_and_publish`.

    The worker marks its job running once admitted, reports progress to the job board, stops on a
    cancel or a lost claim, and before publishing checks its claim and hands over its fence; the
    benchmark only draws progress bars. A hook refuses a step by raising."""

    on_admitted: Callable[[], None] = _nothing
    progress: Callable[[int, int, float], None] | None = None  # (step, total, loss) while training
    should_stop: Callable[[], bool] | None = None  # True stops training (trainer.loop.TrainingCancelled)
    before_publish: Callable[[], Fence | None] = _no_fence  # the fence the store's publish checks


def train_and_publish(
    store: AdapterStore,
    name: str,
    examples: Sequence[TrainingExample],
    method: MethodSpec,
    hp: Hyperparameters,
    load_model: ModelLoader,
    *,
    max_lora_rank: int,
    loraf_grow_rank: int = 0,
    hooks: Hooks | None = None,
    extra_meta: dict[str, Any] | None = None,
    cache_dir: Path | None = None,
    gate: Gate | None = None,
    validation: Sequence[TrainingExample] = (),
) -> tuple[TrainedTask, Publication]:
    """Admit the task named ``name``, train it on the store's live state and publish it.

    The steps run in this order for a reason each:

    1. admission (:func:`trainer.contract.admission.admit`, with the engine's ``max_lora_rank`` and the
       store's ``loraf_grow_rank``) reads only the store, so a task that cannot join (a taken
       name, a full store) is refused at once, before anything slow; and it settles the
       hyper-parameters (a LoRAF task takes the store's rank), so it must come before training;
    2. ``hooks.on_admitted``, then ``load_model``: the model is loaded only for a task that will
       train (loading takes seconds and a refused task needs none);
    3. training on the store's history and subspace as they are now (:func:`train_for_store`):
       the caller holds the store's turn, so nothing publishes in between;
    4. ``hooks.before_publish`` is the last chance to refuse (a worker whose claim lapsed or
       whose job was cancelled while it trained) and returns the fence that the store checks
       atomically with the publish;
    5. the publish itself (:func:`publish_trained`), atomic: the store shows all of the task or
       none of it.

    The meta records the rank asked for (``requested_rank``) beside the rank admission settled,
    then ``extra_meta``. ``cache_dir`` keeps what depends on the base model alone (the routing
    calibration's sampled text) for later jobs and stores. ``validation`` (the user's own
    examples, if any) is what the task is scored on at this and every later publish, instead of
    its held-out examples. Raises :class:`trainer.contract.admission.AdmissionError` on a refusal, and
    whatever a hook raises."""
    hooks = hooks or Hooks()
    requested_rank = hp.r
    hp = admit(store, name, method, hp, max_lora_rank, loraf_grow_rank)
    hooks.on_admitted()
    model, tokenizer = load_model()
    trained = train_for_store(
        model,
        tokenizer,
        store,
        examples,
        method,
        hp,
        progress=hooks.progress,
        should_stop=hooks.should_stop,
        cache_dir=cache_dir,
    )
    evaluation = regression.evaluation_examples(examples, trained.hyperparameters, validation)
    scores = None
    if gate is not None:
        scores = run_gate(gate, model, tokenizer, store, name, method, trained, evaluation, cache_dir)
        if validation and name in scores.row:
            trained.result.metrics["validation_accuracy"] = round(scores.row[name] / 100, 4)
    fence = hooks.before_publish()
    meta = {
        "requested_rank": requested_rank,
        "evaluation": regression.evaluation_meta(evaluation, scores),
        **(extra_meta or {}),
    }
    publication = publish_trained(store, name, examples, method, hp, trained, extra_meta=meta, fence=fence)
    return trained, publication


@dataclass(frozen=True)
class Gate:
    """How a worker checks a candidate before it publishes (:mod:`trainer.regression`)."""

    routing: RoutingMode  # LAMINA_CONTINUAL_ROUTING: what `continual` will serve
    max_forgetting: float  # points an earlier task may lose
    policy: Literal["refuse", "warn"]
    max_general_drop: float = 3.0  # points of agreement with the base's answers on general prompts


def gate_general_set(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, fingerprint: str, cache_dir: Path | None
) -> GeneralSet | None:
    """The gate's general-ability set for this base, built on first use and kept in
    ``cache_dir/general`` (None without a cache directory: building it per job would cost more
    than the check)."""
    if cache_dir is None:
        return None
    return load_or_build(
        cache_dir / "general",
        fingerprint,
        model,
        tokenizer,
        n_sampled=regression.GENERAL_SAMPLES,
        max_questions=regression.GENERAL_QUESTIONS,
    )


def run_gate(
    gate: Gate,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    store: AdapterStore,
    name: str,
    method: MethodSpec,
    trained: TrainedTask,
    evaluation: list[TrainingExample],
    cache_dir: Path | None = None,
) -> regression.Scores:
    """Score the candidate as it will be served on every live task's evaluation set and on the
    general set; raise :class:`trainer.regression.WouldForget` (or, under the ``warn`` policy,
    add a warning). A task taught to apply to every prompt (a style, a persona) is meant to
    change general answers: its drop there is a warning, never a refusal; what it does to the
    earlier tasks is checked like any task's (only the operator's policy lets forgetting through)."""
    loading = time.perf_counter()
    general = gate_general_set(model, tokenizer, store.fingerprint, cache_dir)
    trained.result.metrics["general_set_seconds"] = round(
        time.perf_counter() - loading, 3
    )  # built once per base
    started = time.perf_counter()
    everywhere = trained.routing is not None and trained.routing.applies_to == "all"
    tasks = store.tasks()
    live_metas = {t.name: t.meta for t in tasks}
    new_meta: dict[str, Any] = {"evaluation": regression.evaluation_meta(evaluation, None)}
    if trained.routing is not None:
        new_meta["routing"] = trained.routing.to_dict()
    adapter = trained.result.adapter
    own = (
        merge_deltas(build_merge("concat", [*trained.history, adapter]))
        if method.stack_history
        else adapter.deltas()
    )
    served: dict[str | None, dict[str, torch.Tensor]] = {None: {}, name: own}

    def deltas(target: str | None) -> dict[str, torch.Tensor]:
        if target not in served:
            if target == MERGE:
                served[target] = merge_deltas(
                    build_merge(method.merge, [*trained.history, trained.for_merge])
                )
            else:
                record = next(t for t in tasks if t.name == target)
                served[target] = LoraAdapter.load_peft(record.serving_path).deltas()
        return served[target]

    try:
        scores = regression.check(
            model,
            tokenizer,
            live_metas,
            {**live_metas, name: new_meta},
            gate.routing,
            deltas,
            gate.max_forgetting,
            general,
            100.0 if everywhere else gate.max_general_drop,
            versions={t.name: t.id for t in tasks},
        )
    except regression.WouldForget as refusal:
        if gate.policy == "refuse":
            raise
        trained.result.warnings.append(str(refusal).replace("; the live model stays as it was", ""))
        scores = refusal.scores
    trained.result.metrics["regression_seconds"] = round(time.perf_counter() - started, 3)
    if scores.general is not None:
        trained.result.metrics["general_agreement"] = scores.general
        before = latest_general(list(live_metas.values()))
        if everywhere and before is not None and before - scores.general > gate.max_general_drop:
            trained.result.warnings.append(
                f"this task applies to every prompt, so it changes general answers: `continual` gives the "
                f"base's own answer on {scores.general:.0f} % of general prompts ({before:.0f} % before)"
            )
    return scores


def train_for_store(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    store: AdapterStore,
    examples: Sequence[TrainingExample],
    method: MethodSpec,
    hp: Hyperparameters,
    *,
    progress: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    cache_dir: Path | None = None,
) -> TrainedTask:
    """Train ``examples`` on the store's live tasks; for methods that protect inputs, also
    measure the grown subspace on the model that will be served once this task is live."""
    trained_on = tuple(t.id for t in store.tasks())  # the publish refuses if an admin changes them
    history = store.history()
    previous = store.subspace()
    protects_inputs = getattr(PARAMETRIZATIONS[method.parametrization], "protects_inputs", False)
    seed_metrics: dict[str, Any] = {}
    if protects_inputs and previous is None and hp.subspace_base_energy > 0:
        previous, seed_metrics = _seed_subspace(
            model, tokenizer, method, hp, history, store.fingerprint, cache_dir
        )
    result = train_task(
        model,
        tokenizer,
        examples,
        method,
        hp,
        history,
        subspace=previous,
        progress=progress,
        should_stop=should_stop,
    )
    split = getattr(PARAMETRIZATIONS[method.parametrization], "merge_part", None)
    everywhere = hp.applies_to == "all"  # a style meant to change every answer enters the merge whole
    merge_part, kept = (
        (result.adapter, None) if split is None or everywhere else split(result.adapter, previous)
    )
    if kept is not None:
        result.metrics["merge_kept"] = round(kept, 4)
    subspace = None
    if protects_inputs:
        result.metrics.update(seed_metrics)
        started = time.perf_counter()
        served = merge_deltas(build_merge(method.merge, [*history, merge_part]))
        subspace = grow_subspace(
            model, tokenizer, examples, served, previous, hp.subspace_energy, hp.max_seq_len
        )
        result.metrics.update(
            subspace_metrics(subspace), subspace_seconds=round(time.perf_counter() - started, 3)
        )
    routing = fit_task_prototype(model, tokenizer, examples, store.fingerprint, hp.applies_to, cache_dir)
    return TrainedTask(
        result=result,
        history=history,
        subspace=subspace,
        routing=routing,
        trained_on=trained_on,
        merge_part=merge_part if merge_part is not result.adapter else None,
    )


SEED_CACHE_VERSION = 1  # part of the seed cache's file names: bump when base_subspace changes


def _seed_subspace(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    method: MethodSpec,
    hp: Hyperparameters,
    history: list[LoraAdapter],
    fingerprint: str,
    cache_dir: Path | None = None,
) -> tuple[Subspace, dict[str, Any]]:
    """The subspace a store's first inflora task starts from: the served model's own inputs on
    text it samples (:func:`trainer.subspace_growth.base_subspace`), leaving room for
    BASE_MIN_FREE_TASKS tasks of rank r in every module.

    On an empty store the served model is the base alone, so the seed depends on the base model
    and the settings only: with a ``cache_dir`` it is computed once per base model and read back
    by every later store (it costs SmolLM2-135M a minute or more, the embedded model seconds)."""
    started = time.perf_counter()
    names = target_names(model, hp.target_modules)
    min_free = BASE_MIN_FREE_TASKS * hp.r
    settings = hashlib.sha256(json.dumps([names, hp.subspace_base_energy, min_free]).encode()).hexdigest()[
        :16
    ]
    cached = None
    if cache_dir is not None and not history:
        cached = cache_dir / "seed" / f"{fingerprint}-{settings}-v{SEED_CACHE_VERSION}.safetensors"
    seed = _read_seed(cached, hp.subspace_base_energy)
    if seed is None:
        served = merge_deltas(build_merge(method.merge, history)) if history else {}
        seed = base_subspace(model, tokenizer, names, served, hp.subspace_base_energy, min_free=min_free)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(cached, lambda tmp: save_file(dict(seed.bases), str(tmp)))
    metrics = {
        key.replace("subspace_", "subspace_base_", 1): value for key, value in subspace_metrics(seed).items()
    }
    return seed, {**metrics, "subspace_base_seconds": round(time.perf_counter() - started, 3)}


def _read_seed(path: Path | None, energy: float) -> Subspace | None:
    """A cached seed, or None (no cache, none yet, or an unreadable file: computed again)."""
    if path is None or not path.exists():
        return None
    try:
        return Subspace(bases=load_file(str(path)), energy=energy)
    except Exception:
        return None


def publish_trained(
    store: AdapterStore,
    name: str,
    examples: Sequence[TrainingExample],
    method: MethodSpec,
    hp: Hyperparameters,
    trained: TrainedTask,
    *,
    extra_meta: dict[str, Any] | None = None,
    notes: list[dict[str, Any]] | None = None,
    fence: Fence | None = None,
) -> Publication:
    """Publish a trained task: its version, the new live merge (with the subspace, if any) and,
    for methods that train on top of the earlier tasks, the model as learned for ``model=<task>``.
    The ledger gets the method's own notes (the catalogue's, e.g. LoRAF growing its rank), then
    ``notes``.

    ``fence`` (the worker's claim) makes the store refuse the publish once the claim has lapsed
    (:class:`adapters_store.errors.FenceLost`)."""
    meta = {
        "method": method.name,
        "hyperparameters": trained.hyperparameters.model_dump(mode="json"),
        "data_hash": data_hash(examples),
        "metrics": trained.result.metrics,
        **({"routing": trained.routing.to_dict()} if trained.routing is not None else {}),
        **(extra_meta or {}),
    }
    return store.publish(
        name,
        trained.for_merge,
        meta,
        merge=method.merge,
        notes=[*ledger_notes(method, trained), *(notes or [])],
        subspace=trained.subspace,
        as_learned=method.stack_history,
        own_model=trained.result.adapter if trained.merge_part is not None else None,
        fence=fence,
        trained_on=trained.trained_on,
    )


def ledger_notes(method: MethodSpec, trained: TrainedTask) -> list[dict[str, Any]]:
    """What the method's parts record in the ledger when this task is published."""
    hp = trained.hyperparameters
    return catalog.ledger_notes(method.parametrization, method.merge, method.lambdas(hp), trained.history, hp)


def subspace_metrics(subspace: Subspace) -> dict[str, float | int]:
    """How much of the input space the live tasks now reserve (inflora's capacity): the admin
    view's figures (:func:`adapters_store.subspace.occupancy`), as job metrics."""
    view = occupancy(subspace.summary())
    return {
        "subspace_reserved_mean": round(view["occupancy_mean"], 4),
        "subspace_reserved_max": round(view["occupancy_max"], 4),
        "subspace_free_min": view["free_min"],
    }


def data_hash(examples: Sequence[TrainingExample]) -> str:
    """A short digest of the training data, recorded with the task (what exactly was learned).

    Prompt/completion pairs hash as they always have, so earlier tasks keep their digests; a chat
    example hashes as its JSON, which never holds a raw NUL byte, so it cannot read as a pair."""
    digest = hashlib.sha256()
    for example in examples:
        if isinstance(example, ChatExample):
            digest.update(json.dumps(asdict(example), ensure_ascii=False).encode() + b"\n")
        else:
            digest.update(example.prompt.encode() + b"\0" + example.completion.encode() + b"\n")
    return digest.hexdigest()[:16]
