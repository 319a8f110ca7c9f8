"""Prometheus metrics: what ``GET /metrics`` serves, defined in one place.

Two sources, one text:

- vLLM's engine metrics (``vllm:*``: requests running and waiting, prompt and generation
  tokens, time to first token, inter-token latency, KV-cache use, LoRA requests). vLLM's
  ``AsyncLLM`` records them into prometheus_client's process registry whenever its stats are
  on, which they are by default (``disable_log_stats=False``); they appear once the engine has
  started.
- Lamina's own (``lamina_*``), in a registry per app, so that two apps in one process (the
  tests) never share counters: answered requests by model and serving version, hot-swaps,
  adapter loads and unloads, publish→live latency, training jobs by status and the seconds they
  trained (read from the job board when scraped), and the live merge's capacity: inflora's
  subspace occupancy (from the merge's meta, set on every swap) and the B-position (mask)
  occupancy of the admin stats (computed in the background once per live merge, on the first
  scrape that sees it, and cached with the admin stats; never at every scrape); and what the
  check before each publish measured (:mod:`adapters_store.evaluation`): each live task's latest
  accuracy, the share of general prompts given the base's own answer, and the publishes it
  refused (jobs failed ``would_forget``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter as Tally
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from trainer.contract.board import WOULD_FORGET, JobBoard
from trainer.contract.jobs import JobStatus

if TYPE_CHECKING:
    from adapters_store.store import AdapterStore, MergeRecord, TaskRecord
    from server.swap.registry import Route

log = logging.getLogger(__name__)

# Seconds from a ledger change (publish, rollback, removal) to this server serving it: the
# event path is sub-second, the ledger poll half a second, an SVD export of a dense merge longer.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class LaminaMetrics:
    """Lamina's metrics for one app; the serving code and the hot-swap update them."""

    def __init__(self, board: JobBoard | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lamina_requests",
            "Completion and chat requests answered, by endpoint, requested model (base, continual, a "
            "task) and the adapter version that served it (the response's system_fingerprint).",
            ["endpoint", "model", "version"],
            registry=r,
        )
        self.continual_routes = Counter(
            "lamina_continual_routes",
            "Requests for `continual`, by what answered them: the live merge (the prompt matched a learned "
            "task), a task's own model (LAMINA_CONTINUAL_ROUTING=task) or the base model itself.",
            ["to"],
            registry=r,
        )
        self.hot_swaps = Counter(
            "lamina_hot_swaps",
            "Store changes (publish, rollback, task removal) this server has swapped in without a restart.",
            registry=r,
        )
        self.sync_failures = Counter(
            "lamina_sync_failures",
            "Syncs with the store that failed; the adapters served stayed as they were.",
            registry=r,
        )
        self.adapter_loads = Counter(
            "lamina_adapter_loads", "Adapter versions loaded into the engine.", registry=r
        )
        self.adapter_unloads = Counter(
            "lamina_adapter_unloads",
            "Adapter versions removed from the engine (no alias and no request held them any more).",
            registry=r,
        )
        self.adapters_loaded = Gauge(
            "lamina_adapters_loaded", "Adapter versions loaded in the engine now.", registry=r
        )
        self.publish_to_live = Histogram(
            "lamina_publish_to_live_seconds",
            "From the ledger entry that changed the live merge (its timestamp) to this server serving it.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.served_error = Gauge(
            "lamina_served_model_relative_error",
            "Per served model: 0 when the engine serves it exactly, else the relative error of the "
            "truncated SVD that serves it (GET /v1/models says the same as exact / relative_error).",
            ["model"],
            registry=r,
        )
        self.subspace_occupancy = Gauge(
            "lamina_subspace_occupancy",
            "inflora: share of a module's input directions reserved by the live tasks (1 = full).",
            ["module"],
            registry=r,
        )
        self.subspace_occupancy_max = Gauge(
            "lamina_subspace_occupancy_max",
            "inflora: the fullest module's subspace occupancy.",
            registry=r,
        )
        self.subspace_free_min = Gauge(
            "lamina_subspace_free_directions_min",
            "inflora: input directions left free in the fullest module (the store's remaining capacity).",
            registry=r,
        )
        self.mask_occupancy = Gauge(
            "lamina_mask_occupancy",
            "Share of the live merge's B positions owned by some live task (the admin stats' occupancy).",
            registry=r,
        )
        self.task_accuracy = Gauge(
            "lamina_task_accuracy_percent",
            "Each live task's accuracy (%) on its evaluation set, served as `continual`, as the check before "
            "the latest publish measured it (the last row of the admin view's accuracy matrix).",
            ["task"],
            registry=r,
        )
        self.general_agreement = Gauge(
            "lamina_general_agreement_percent",
            "Share (%) of general prompts on which `continual` gives the base model's own answer, as the "
            "check before the latest publish measured it (100 with no live task).",
            registry=r,
        )
        if board is not None:
            r.register(JobBoardCollector(board))
        self._live: str | None = None  # the merge served as continual, as of the last swap
        self._stats_for: str | None = None  # the merge the mask occupancy was computed for
        self._stats_task: asyncio.Task[None] | None = None

    # --- the hot-swap reports what it serves ------------------------------------------------

    def approximations(self, routes: list[Route]) -> None:
        """How exactly each served model is served, after a sync flipped the routes."""
        self.served_error.clear()
        for route in routes:
            self.served_error.labels(model=route.name).set(route.relative_error or 0.0)

    def serving(self, live: MergeRecord | None) -> None:
        """The live merge a sync now serves: its subspace occupancy, read from its meta."""
        from adapters_store.subspace import occupancy

        self._live = live.id if live else None
        self.subspace_occupancy.clear()
        summary = live.meta.get("subspace") if live else None
        if not summary:
            self.subspace_occupancy_max.set(0)
            self.subspace_free_min.set(0)
            return
        view = occupancy(summary)
        for module, figures in view["modules"].items():
            self.subspace_occupancy.labels(module=module).set(figures["occupancy"])
        self.subspace_occupancy_max.set(view["occupancy_max"] or 0)
        self.subspace_free_min.set(view["free_min"] or 0)

    def evaluated(self, tasks: list[TaskRecord]) -> None:
        """The live tasks' latest scores and general agreement, after a sync flipped the routes."""
        from adapters_store.evaluation import latest_general, latest_row

        metas = [t.meta for t in tasks]
        latest = latest_row(metas)
        self.task_accuracy.clear()
        for name in (t.name for t in tasks):
            if name in latest:
                self.task_accuracy.labels(task=name).set(latest[name])
        general = latest_general(metas)
        self.general_agreement.set(float("nan") if general is None else general)

    def swapped(self, changed_at: str | None) -> None:
        """A store change reached this server; ``changed_at`` is its ledger entry's timestamp."""
        self.hot_swaps.inc()
        if changed_at is not None:
            seconds = time.time() - datetime.fromisoformat(changed_at).timestamp()
            self.publish_to_live.observe(max(seconds, 0.0))

    # --- scraping ---------------------------------------------------------------------------

    def refresh_mask_occupancy(self, store: AdapterStore) -> None:
        """Start computing the live merge's mask occupancy in the background if it is not known
        yet; never waits for it (the next scrape shows it)."""
        if self._live is None:
            self.mask_occupancy.set(0)
            self._stats_for = None
            return
        if self._live == self._stats_for or (self._stats_task is not None and not self._stats_task.done()):
            return
        self._stats_task = asyncio.get_running_loop().create_task(
            asyncio.to_thread(self._compute_mask_occupancy, store, self._live)
        )

    def _compute_mask_occupancy(self, store: AdapterStore, merge: str) -> None:
        from adapters_store.stats_cache import stats_for_store

        try:
            stats = stats_for_store(store)
        except Exception:  # a metric must never take the server down; the admin view shows the error
            log.warning("could not compute the store's stats for /metrics", exc_info=True)
            self._stats_for = merge  # not again until the live merge changes
            return
        if stats["store_version"]["merge"] == merge and stats["aggregate"].get("occupancy") is not None:
            self.mask_occupancy.set(stats["aggregate"]["occupancy"])
        self._stats_for = merge

    def exposition(self) -> bytes:
        """The text format of vLLM's metrics (the process registry) followed by Lamina's."""
        return generate_latest(REGISTRY) + generate_latest(self.registry)


class JobBoardCollector(Collector):
    """Training jobs by status and the seconds finished jobs trained, read from the job board
    (shared by every replica and worker of the store) each time the metrics are scraped."""

    def __init__(self, board: JobBoard) -> None:
        self.board = board

    def describe(self) -> Iterable[Metric]:
        return list(_job_families())

    def collect(self) -> Iterable[Metric]:
        jobs, trained, refused = _job_families()
        board = self.board.all()
        counts = Tally(job.status for job in board)
        for status in JobStatus:
            jobs.add_metric([status.value], counts.get(status, 0))
        refused.add_metric(
            [], sum(1 for job in board if job.error is not None and job.error.code == WOULD_FORGET)
        )
        seconds: dict[str, float] = {}
        for job in board:
            spent = job.metrics.get("seconds")
            if job.status.terminal and isinstance(spent, int | float):
                seconds[job.method] = seconds.get(job.method, 0.0) + float(spent)
        for method, total in sorted(seconds.items()):
            trained.add_metric([method], total)
        return [jobs, trained, refused]


def _job_families() -> tuple[GaugeMetricFamily, CounterMetricFamily, CounterMetricFamily]:
    return (
        GaugeMetricFamily(
            "lamina_jobs", "Training jobs on the store's job board, by status.", labels=["status"]
        ),
        CounterMetricFamily(
            "lamina_training_seconds",
            "Seconds in the training loop (scoring excluded) of the finished jobs on the board, by method.",
            labels=["method"],
        ),
        CounterMetricFamily(
            "lamina_publishes_refused",
            "Jobs on the board whose publish the check refused because `continual` would have forgotten "
            "(failed with code would_forget): the live model stayed as it was.",
        ),
    )
