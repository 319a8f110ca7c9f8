"""``continual`` served from the engine's weights, for every merge kind and store size.

    .venv/bin/python bench/serve/weights.py                  # CPU defaults, ~25 min on 2 cores
    .venv/bin/python bench/serve/weights.py --kinds concat --tasks 1 8 --rounds 1 --requests 16  # a look

The goal this measures (issue 15): ``continual`` TPOT ≤ 1.05× the base model's on the same server,
with 1, 8 and 32 tasks of every merge kind, with the merge written into the weights
(``LAMINA_CONTINUAL_SERVING=weights``, the default); and what ``base`` and a task's model cost
once they are corrections relative to those weights (server/swap/corrections.py).

One server per merge kind (``server/processes.py``), on a store of synthetic tasks published
one by one through ``AdapterStore.publish`` (real PEFT files, the real merges):

- ``concat`` (LoRI-D): tasks of rank ``--task-rank``; the merge's rank is tasks × rank;
- ``sum`` (LoRAF): one frozen A shared by all tasks, B masks disjoint (position (i, j) belongs to
  task (i·r + j) mod the task count), so the merge stays rank ``--task-rank``;
- ``magnitude`` (PS-LoRA): the dense elementwise merge of the tasks' ΔW.

Every task targets all seven projections. The store's ledger keeps the merge after 1, 8, 32 tasks;
before each measurement the scenario puts the server where it needs it, so scenarios interleave
round by round: ``base`` rounds roll back to the store's first merge, of one task whose ΔW is
exactly 0 (the engine holds W0 + 0 = W0 and ``base``'s correction is zero, so it is the plain base
model with no adapter: the reference), ``continual, n tasks`` rounds roll back to the merge of
that zero task and n tasks (the server writes W0 + ΔW), and the correction rows roll back to the
largest merge and ask for ``base`` or the first task. Ratios, the table and the JSON are bench/serve/run.py's
(``bench/results/serve_weights.{json,md}``), plus each correction's rank and error and each
switch's time. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from adapters_store.lora import LoraAdapter, LoraModule  # noqa: E402
from bench import serving_common as common  # noqa: E402
from bench.report import RESULTS, envelope, markdown_table, report_head, write_result  # noqa: E402
from bench.serve.run import (  # noqa: E402
    Scenario,
    ServerPlan,
    execute,
    lamina_starter,
    record_plans,
    table,
    wait_for_live,
)
from server.processes import ManagedProcess  # noqa: E402
from trainer.methods.parametrizations import kaiming_uniform, module_seed  # noqa: E402

ADMIN_KEY = "bench-weights"


def sum_task(shapes: dict[str, tuple[int, int]], rank: int, index: int, tasks: int) -> LoraAdapter:
    """A LoRAF-shaped task: the store's shared A, B on this task's disjoint share of positions."""
    generator = torch.Generator().manual_seed(1000 + index)
    modules, masks = {}, {}
    for m, (name, (d_out, d_in)) in enumerate(shapes.items()):
        A = kaiming_uniform((rank, d_in), seed=module_seed(0, m))  # (r, d_in), one A for all tasks
        owner = (torch.arange(d_out)[:, None] * rank + torch.arange(rank)[None, :]) % tasks  # (d_out, r)
        mask = owner == index
        B = common.B_STD * torch.randn(d_out, rank, generator=generator) * mask
        modules[name] = LoraModule(A=A, B=B, scale=2.0)
        masks[name] = mask
    return LoraAdapter(modules=modules, masks=masks)


def zero_task(kind: str, shapes: dict[str, tuple[int, int]], rank: int, tasks: int) -> LoraAdapter:
    """A task whose ΔW is exactly 0 (B = 0; for sum, no mask positions either)."""
    adapter = (
        sum_task(shapes, rank, tasks, tasks) if kind == "sum" else common.random_lora(shapes, rank, seed=999)
    )
    modules = {
        n: LoraModule(A=m.A, B=torch.zeros_like(m.B), scale=m.scale) for n, m in adapter.modules.items()
    }
    return LoraAdapter(modules=modules, masks={n: torch.zeros_like(m) for n, m in adapter.masks.items()})


def build_store(kind: str, root: Path, model_dir: Path, counts: list[int], rank: int) -> dict[int, str]:
    """A zero task, then max(counts) tasks of ``kind``; returns task count -> the merge live after
    them, 0 -> the zero task's merge (W0 + 0 in the weights: ``base`` needs no correction there)."""
    store = common.open_store(root, model_dir)
    shapes = common.target_shapes(model_dir)
    total = max(counts)
    method = {"concat": "lori-d", "sum": "loraf", "magnitude": "ps-lora"}[kind]
    meta = {"method": method, "synthetic": True, "zero": True}
    merges = {0: store.publish("zero", zero_task(kind, shapes, rank, total), meta, merge=kind).merge.id}
    for i in range(total):
        if kind == "sum":
            meta = {"method": "loraf", "synthetic": True, "seed": 1000 + i}
            publication = store.publish(f"t{i}", sum_task(shapes, rank, i, total), meta, merge="sum")
        else:
            publication = common.publish_random(store, f"t{i}", shapes, rank, i, method, kind)
        if i + 1 in counts:
            merges[i + 1] = publication.merge.id
    return merges


def kind_plan(kind: str, args: argparse.Namespace, work: Path, model_dir: Path) -> ServerPlan:
    root = work / kind / "store"
    merges = build_store(kind, root, model_dir, args.tasks, args.task_rank)
    store = common.open_store(root, model_dir)
    largest = max(args.tasks)
    settings = {**args.settings, "continual_serving": "weights", "admin_key": ADMIN_KEY}

    def live(merge: str) -> Callable[[ManagedProcess], dict[str, Any]]:
        def before(server: ManagedProcess) -> dict[str, Any]:
            started = time.perf_counter()
            if (current := store.live()) is None or current.id != merge:
                store.rollback(merge)
            written = time.perf_counter()
            wait_for_live(server.url, merge)
            return {"to": merge, "store_s": written - started, "to_live_s": time.perf_counter() - written}

        return before

    scenarios = [Scenario("base", ["base"], before=live(merges[0]))]
    scenarios += [
        Scenario(f"continual, {n} tasks", ["continual"], before=live(merges[n])) for n in args.tasks
    ]
    scenarios += [
        Scenario(f"base as correction, {largest} tasks", ["base"], before=live(merges[largest])),
        Scenario(f"task t0 as correction, {largest} tasks", ["t0"], before=live(merges[largest])),
    ]
    config = {
        "store": f"{kind}, up to {largest} tasks x r{args.task_rank}, all projections",
        "settings": settings,
    }
    plan = ServerPlan(kind, scenarios, lamina_starter(kind, work / kind, root, settings), config)
    plan.after = corrections_after(merges)
    return plan


def corrections_after(merges: dict[int, str]) -> Callable[[ManagedProcess], dict[str, Any]]:
    """After the rounds: each store size's corrections (rank, error) and swap times, from the
    server's admin view (rolling back to each merge in turn)."""

    def after(server: ManagedProcess) -> dict[str, Any]:
        out: dict[str, Any] = {}
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        for count, merge in sorted(merges.items()):
            httpx.post(f"{server.url}/admin/rollback", json={"merge_id": merge}, headers=headers, timeout=600)
            wait_for_live(server.url, merge)
            served = httpx.get(f"{server.url}/admin/adapters", headers=headers, timeout=60).json()["served"]
            corrections = served.get("corrections") or {}
            out[str(count)] = {
                "merge": merge,
                "weights": served.get("weights"),
                "base": corrections.get("base"),
                "t0": corrections.get("t0"),
                "max_task_error": max((c["relative_error"] for c in corrections.values()), default=0.0),
                "inexact": sum(not c["exact"] for c in corrections.values()),
                "corrections": len(corrections),
            }
        return out

    return after


def corrections_table(plans: list[ServerPlan]) -> str:
    headers = [
        "merge",
        "tasks",
        "base: rank / served / error",
        "t0: rank / served / error",
        "inexact",
        "swap s (write s)",
    ]
    rows = []
    for plan in plans:
        for count, facts in (plan.facts.get("after") or {}).items():
            weights = facts.get("weights") or {}
            rows.append([
                plan.name, count, _corr(facts.get("base")), _corr(facts.get("t0")),
                f"{facts['inexact']}/{facts['corrections']}",
                f"{weights.get('last_swap_s', 0):.3f} ({weights.get('last_write_s', 0):.3f})",
            ])  # fmt: skip
    return markdown_table(headers, rows)


def _corr(c: dict[str, Any] | None) -> str:
    if not c:
        return "-"
    return f"{c['rank']} / {c['served_rank']} / {c['relative_error']:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", default=["concat", "sum", "magnitude"])
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 8, 32], help="store sizes measured")
    parser.add_argument("--task-rank", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48, help="requests per scenario per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    common.add_server_arguments(parser)
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_weights.json")
    args = common.parse_server_arguments(parser)
    torch.set_num_threads(1)  # building the stores (SVD exports): many small LAPACK calls, see
    # server/swap/corrections.py _one_thread; the servers are other processes and keep their own
    config = {k: v for k, v in vars(args).items() if k not in ("out", "work")}
    result = envelope("serve_weights", config)
    model_dir = common.base_model_dir()
    with tempfile.TemporaryDirectory(prefix="lamina-serve-weights-") as tmp:
        work = args.work or Path(tmp)
        plans = []
        for kind in args.kinds:
            print(f"building the {kind} store ...", flush=True)
            plans.append(kind_plan(kind, args, work, model_dir))
        for plan in plans:
            execute(plan, args, work / "logs")
    record_plans(result, plans)  # every scenario here switches to its live merge first
    text = "\n".join([
        *report_head("bench/serve/weights.py", result),
        table(result["scenarios"]), "", "Corrections (rank needed / served / relative error) and swap times:", "",
        corrections_table(plans),
    ]) + "\n"  # fmt: skip
    print(text)
    write_result(result, args.out, text)


if __name__ == "__main__":
    main()
