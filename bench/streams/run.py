"""Streams across swaps, at load: many streaming clients on ``continual`` while versions are
published and one is rolled back. The goals: 0 failed requests and 0 mixed-version answers.

    .venv/bin/python bench/streams/run.py                    # 64 clients, 10 publishes, 1 rollback
    .venv/bin/python bench/streams/run.py --clients 8 --publishes 2   # a quick look

A real ``python -m server serve`` (``server/processes.py``) on a synthetic LoRI-D store, with
Redis events when Redis answers (else the server polls the ledger). ``--clients`` clients stream
``model=continual`` completions back to back (sampled, ``ignore_eos``, ``--max-tokens`` long on
average; lengths varied and starts staggered so that requests do not move in waves). Meanwhile this process publishes ``--publishes`` synthetic tasks ``--interval`` s apart through
``AdapterStore.publish`` (each makes a new concat merge live, as a worker's publish does), then
rolls back to the version before the last one through ``POST /admin/rollback``. Every stream
chunk names the engine version that served it (``system_fingerprint``, e.g. ``continual@m7``):

- **failed**: requests that got an error or a stream without ``[DONE]`` (goal 0);
- **mixed**: requests whose chunks name two versions (goal 0: a stream keeps one version);
- **unnamed**: requests with no ``system_fingerprint`` at all (goal 0: the check above needs it);
- **stale**: requests sent after the current version had answered someone, yet served by an
  older one (goal 0); one sent just before the next change may rightly get that newer version;
- **change → first answer**: from a publish returning (the ledger names the new merge), or a
  rollback request being sent, to the first token from that version;
- **in flight**: streams open across each change (the swaps happen under streams, not between);
- **never answered**: versions replaced before any request reached them (not an error: under
  enough load a version can be live for less time than it takes a new request to be admitted);
- ITL near a change (gaps ending within ``--stall-window`` s after it) against the rest.

Each backend in ``--backends`` is one run and one row: ``files`` (the store in a directory, the
default layout) and ``database-s3`` (the ledger in PostgreSQL at ``--database-url``, the files in
a bucket on moto's S3 server started here, the server reading them through its local copy: the
multi-host layout).

Prints a table and writes ``bench/results/streams.{json,md}``. Not a test: the CI version is
``tests/integration/test_replicas.py`` (8 clients on two replicas, 2 publishes, 1 rollback).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from bench import serving_common as common  # noqa: E402
from bench.report import RESULTS, envelope, markdown_table, report_head, write_result  # noqa: E402
from bench.serve.client import (  # noqa: E402
    PROMPTS,
    RequestResult,
    completion_body,
    loop_until,
    percentiles,
)
from bench.swap.run import Publisher, gaps_near, longest_gap, redis_reachable  # noqa: E402
from server.processes import lamina_env, running, start_server  # noqa: E402
from server.swap.registry import CONTINUAL  # noqa: E402

ADMIN_KEY = "bench-streams-admin"


@dataclass
class Change:
    """One change of the live version: a publish or a rollback, in ``time.perf_counter()`` s."""

    kind: str  # "publish" | "rollback"
    merge: str
    fingerprint: str  # what answers from it carry
    started: float  # the publish call or the rollback request began
    effective: float  # publish: the call returned (ledger written); rollback: = started


async def run_streams(
    args: argparse.Namespace, work: Path, redis_url: str | None, shared: common.SharedStore | None
) -> dict[str, Any]:
    """Start the server, stream with ``args.clients`` clients, publish and roll back under them."""
    model_dir = common.base_model_dir()
    publisher = Publisher(
        work / "publisher" if shared else work / "store", model_dir, args.task_rank, redis_url, shared
    )
    for _ in range(args.initial_tasks):
        publisher.publish_one()
    total_rank = args.task_rank * (args.initial_tasks + args.publishes)
    settings: dict[str, Any] = {
        **args.settings,
        "max_lora_rank": common.lora_slot(total_rank),
        "admin_key": ADMIN_KEY,
    }
    if redis_url:
        settings["redis_url"] = redis_url
    if shared:  # the server's store is the bucket, read through its own copy under work/store
        env = {**lamina_env(work, None, **settings), **shared.env()}
    else:
        env = lamina_env(work, work / "store", **settings)
    print(f"== starting server ({settings}) ...", flush=True)
    server = await asyncio.to_thread(start_server, env, work / "server.log", name="streams", cwd=REPO)
    results: list[RequestResult] = []
    changes: list[Change] = []
    stop = asyncio.Event()

    with running(server):
        async with streaming_client(args.clients) as client:

            async def stream_client(k: int) -> None:
                await asyncio.sleep(k * args.stagger / args.clients)
                await loop_until(client, server.url, client_body(k, args.max_tokens), stop, results)

            loops = [asyncio.create_task(stream_client(k)) for k in range(args.clients)]
            await asyncio.sleep(args.warmup)
            hot_start = time.perf_counter()
            for _ in range(args.publishes):
                published = await asyncio.to_thread(publisher.publish_one)
                changes.append(
                    Change(
                        "publish",
                        published.merge,
                        published.fingerprint,
                        published.started,
                        published.published,
                    )
                )
                print(f"  published {published.merge}", flush=True)
                await asyncio.sleep(args.interval)
            if args.publishes >= 2:
                target = changes[-2].merge
                started = time.perf_counter()
                response = await client.post(
                    f"{server.url}/admin/rollback",
                    json={"merge_id": target},
                    headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                )
                response.raise_for_status()
                changes.append(Change("rollback", target, f"{CONTINUAL}@{target}", started, started))
                print(f"  rolled back to {target}", flush=True)
                await asyncio.sleep(args.interval)
            hot_end = time.perf_counter()
            stop.set()
            await asyncio.gather(*loops)
    return {"results": results, "changes": changes, "hot": (hot_start, hot_end), "start_s": server.started_s}


def streaming_client(clients: int) -> httpx.AsyncClient:
    """Like ``bench.serve.client.http_client``, but a pooled connection is dropped after 2 s idle,
    before uvicorn closes it (5 s): with both at 5 s a request sent on a connection the server
    is closing at that moment fails with a ReadError that says nothing about swaps (one in ~900
    requests here, with no trace in the server's access log)."""
    limits = httpx.Limits(
        max_connections=clients + 4, max_keepalive_connections=clients + 4, keepalive_expiry=2.0
    )
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0, connect=10.0))


def client_body(k: int, max_tokens: int) -> Callable[[int], dict[str, Any]]:
    """Client ``k``'s ``i``-th request. Lengths vary from max_tokens/2 to 3·max_tokens/2 and the
    clients start staggered, so requests start and end at all times rather than in waves: with
    equal lengths the whole batch finishes together and a version live between two waves is
    never asked for."""

    def body(i: int) -> dict[str, Any]:
        length = max_tokens // 2 + (7 * k + 3 * i) % (max_tokens + 1)
        return completion_body(CONTINUAL, PROMPTS[(k + i) % len(PROMPTS)], length, seed=1000 * k + i)

    return body


# --- analysis --------------------------------------------------------------------------------------


def first_answer(results: list[RequestResult], change: Change, previous: float | None) -> float | None:
    """The first token from the version ``change`` made live. A published version is new, so any
    answer carrying it counts. A rollback's version answered before: only requests sent after
    the rollback began, and after the version it replaces first answered (``previous``), count;
    the server may still have been swapping to that version when the rollback came."""
    since = max(change.started, previous or change.started)
    return min(
        (
            r.first
            for r in results
            if r.ok
            and r.first is not None
            and r.fingerprint == change.fingerprint
            and (r.first >= change.started if change.kind == "publish" else r.sent >= since)
        ),
        default=None,
    )


def analyse(run: dict[str, Any], window: float) -> dict[str, Any]:
    results: list[RequestResult] = run["results"]
    changes: list[Change] = run["changes"]
    hot_start, hot_end = run["hot"]
    during = [r for r in results if hot_start <= r.done and r.sent <= hot_end]  # open during the changes
    firsts: list[float | None] = []
    for change in changes:
        firsts.append(first_answer(results, change, firsts[-1] if firsts else None))
    stale: list[dict[str, Any]] = []
    for i, (change, first) in enumerate(zip(changes, firsts, strict=True)):
        until = changes[i + 1].started if i + 1 < len(changes) else hot_end
        if first is None:
            continue
        # a request the server admitted after the next change began rightly got a newer version
        newer = {c.fingerprint for c in changes[i:]}
        stale += [
            {"live": change.fingerprint, "served": r.fingerprint, "sent_after_first_s": r.sent - first}
            for r in results
            if r.ok and first < r.sent < until and r.fingerprint not in newer
        ]
    delays = {
        kind: [
            f - c.effective for c, f in zip(changes, firsts, strict=True) if f is not None and c.kind == kind
        ]
        for kind in ("publish", "rollback")
    }
    near, far = gaps_near(during, [c.effective for c in changes], window)
    return {
        "requests": len(during),
        "requests_total": len(results),
        "failed": sum(not r.ok for r in results),
        "errors": sorted({(r.error or "")[:160] for r in results if r.error})[:5],
        "failed_examples": [
            {
                "error": (r.error or "")[:160],
                "sent_s": r.sent - hot_start,  # from the start of the changes
                "done_s": r.done - hot_start,
                "text_chunks": len(r.chunks),
                "fingerprints": r.fingerprints,
            }
            for r in results
            if not r.ok
        ][:10],
        "mixed_versions": sum(r.mixed for r in results),
        "unnamed": sum(r.ok and not r.fingerprints for r in results),
        "stale_answers": len(stale),
        "stale_examples": stale[:10],
        "changes": len(changes),
        "never_answered": sum(f is None for f in firsts),
        "in_flight_at_change": [sum(r.sent < c.effective < r.done for r in results) for c in changes],
        "publish_to_first_answer_s": percentiles(delays["publish"], (50, 95, 100), scale=1.0),
        "rollback_to_first_answer_s": delays["rollback"],
        "publish_call_s": percentiles(
            [c.effective - c.started for c in changes if c.kind == "publish"], (50, 95, 100), scale=1.0
        ),
        "longest_no_answer_s": longest_gap(sorted(r.first for r in during if r.ok and r.first is not None)),
        "output_tokens": sum(r.output_tokens for r in results if r.ok),
        "hot_s": hot_end - hot_start,
        "itl_ms_near_change": {**percentiles(near, (50, 99, 100)), "n": len(near)},
        "itl_ms_elsewhere": {**percentiles(far, (50, 99, 100)), "n": len(far)},
        "versions_served": sorted({r.fingerprint for r in results if r.fingerprint}),
    }


# --- reporting ---------------------------------------------------------------------------------------


def _s(figures: dict[str, float | None]) -> str:
    return " / ".join("-" if v is None else f"{v:.2f}" for v in figures.values())


def _ms(figures: dict[str, Any]) -> str:
    return " / ".join("-" if figures[k] is None else f"{figures[k]:.0f}" for k in ("p50", "p99", "p100"))


def table(result: dict[str, Any]) -> str:
    return markdown_table(HEADERS, [row(result["config"], run) for run in result["runs"]])


HEADERS = [
        "backend", "clients", "mode", "publishes + rollbacks", "requests", "failed", "mixed", "unnamed", "stale",
        "in flight per change min/max", "versions never answered", "publish → first answer s p50/p95/max", "rollback → first answer s",
        "longest no-answer s", "ITL ms p50/p99/max near change", "elsewhere",
]  # fmt: skip


def row(c: dict[str, Any], run: dict[str, Any]) -> list[Any]:
    a = run["streams"]
    rollback = " ".join(f"{v:.2f}" for v in a["rollback_to_first_answer_s"]) or "-"
    flight = a["in_flight_at_change"]
    return [
        run["backend"], c["clients"], run["mode"], f"{c['publishes']} + {a['changes'] - c['publishes']}", a["requests"],
        a["failed"], a["mixed_versions"], a["unnamed"], a["stale_answers"],
        f"{min(flight, default=0)}/{max(flight, default=0)}", a["never_answered"], _s(a["publish_to_first_answer_s"]), rollback,
        a["longest_no_answer_s"], _ms(a["itl_ms_near_change"]), _ms(a["itl_ms_elsewhere"]),
    ]  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [
        *report_head("bench/streams", result),
        f"{c['clients']} clients streaming `model=continual` (max_tokens {c['max_tokens']}, ignore_eos) back to "
        f"back; {c['publishes']} publishes {c['interval']} s apart, then a rollback to the version before the "
        f"last, through POST /admin/rollback. `requests` = those open during the changes; `failed`, `mixed`, "
        "`unnamed` count every request of the run. `stale` = answers from an older version to requests sent "
        "after the current one had answered. `versions never answered` = versions replaced before any "
        "request reached them. ITL 'near change' = gaps ending within "
        f"{c['stall_window']} s after a change.",
        "",
        table(result),
    ]
    if result.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(result["skipped"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64, help="concurrent streaming clients")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--publishes", type=int, default=10, help="new versions published under the streams")
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between changes")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--stagger", type=float, default=2.0, help="seconds over which the clients start")
    parser.add_argument("--initial-tasks", type=int, default=1)
    parser.add_argument("--task-rank", type=int, default=4, help="rank of each published task")
    parser.add_argument("--mode", choices=["redis", "poll"], default="redis", help="how the server follows")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--stall-window", type=float, default=2.0)
    parser.add_argument(
        "--backends", default="files,database-s3", help="comma-separated: files, database-s3 (one row each)"
    )
    parser.add_argument(
        "--database-url",
        default="postgresql://postgres@127.0.0.1:5432/lamina_bench",
        help="database-s3: the PostgreSQL database for the ledger (created if missing)",
    )
    common.add_server_arguments(parser)
    parser.add_argument("--out", type=Path, default=RESULTS / "streams.json")
    args = common.parse_server_arguments(parser)
    result = run(args)
    print(table(result))
    write_result(result, args.out, markdown(result))


def run(args: argparse.Namespace) -> dict[str, Any]:
    result = envelope("streams", {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    result["skipped"] = []
    redis_url = args.redis_url if args.mode == "redis" else None
    if redis_url and not redis_reachable(redis_url):
        result["skipped"].append(f"redis mode: no Redis at {redis_url}; the server polled the ledger")
        redis_url = None
    result["runs"] = []
    for backend in args.backends.split(","):
        with (
            tempfile.TemporaryDirectory(prefix="lamina-streams-bench-") as tmp,
            shared_store(backend, args) as shared,
        ):
            work = (args.work / backend) if args.work else Path(tmp)
            print(f"== backend {backend}", flush=True)
            session = asyncio.run(run_streams(args, work, redis_url, shared))
        run_result = {
            "backend": backend,
            "mode": "redis" if redis_url else "poll",
            "streams": analyse(session, args.stall_window),
            "server_start_s": session["start_s"],
            "changes": [asdict(c) for c in session["changes"]],
            "load_average_at_end": list(os.getloadavg()),
        }
        print(f"  {run_result['streams']}", flush=True)
        result["runs"].append(run_result)
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    return result


@contextmanager
def shared_store(backend: str, args: argparse.Namespace) -> Iterator[common.SharedStore | None]:
    """None for ``files``; for ``database-s3`` a fresh store in the database (migrated, created
    if missing) and a bucket prefix on moto's S3 server, started for this run."""
    if backend == "files":
        yield None
        return
    if backend != "database-s3":
        raise SystemExit(f"--backends: unknown backend {backend!r} (files, database-s3)")
    from adapters_store.database import migrate
    from bench.object_storage import s3_server

    ensure_database(args.database_url)
    migrate(args.database_url)
    with s3_server() as s3:
        yield common.SharedStore(
            args.database_url, f"{s3.store_url()}-{uuid.uuid4().hex[:6]}", s3.endpoint_url
        )


def ensure_database(url: str) -> None:
    """Create the database ``url`` names if the server lacks it (connecting to its ``postgres``)."""
    import psycopg

    from adapters_store.database import libpq_url

    base, _, name = libpq_url(url).rpartition("/")
    with psycopg.connect(f"{base}/postgres", autocommit=True) as admin:
        if admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            admin.execute(f'CREATE DATABASE "{name}"')


if __name__ == "__main__":
    main()
