"""Hot-swap under load: how fast a published version answers, and what clients notice.

    .venv/bin/python bench/swap/run.py                     # CPU defaults, ~4 min on 2 cores
    .venv/bin/python bench/swap/run.py --modes poll --publishes 3 --restarts 0   # a quick look

A real ``python -m server serve`` (``server/processes.py``) on a synthetic LoRI-D store
(``bench/serving_common.py``).
``--clients`` clients stream ``model=continual`` completions back to back, plus one probe client
whose answers are one token long (so a new version is seen within about one short request, not
one long one). Meanwhile this process publishes ``--publishes`` new tasks, ``--interval`` seconds
apart, through ``AdapterStore.publish``; each makes a new concat merge live, which the server
loads and flips to while the clients keep streaming. Every answer carries the engine adapter
version that served it in ``system_fingerprint`` (``continual@m7``), so the client sees:

- publish → first answer from the new version: from ``publish`` returning (ledger written) to the
  first text chunk of an answer with the new fingerprint (p50/p95/max over the publishes);
- failed requests (goal 0), and requests that *mixed versions* (chunks with two fingerprints;
  goal 0: a request holds one version for its whole life);
- stale answers: requests sent after the new version had already answered someone, yet served
  by an older one (goal 0);
- stalls: inter-chunk gaps within ``--stall-window`` seconds after each publish, against the rest.

Modes: ``poll`` (the server follows the ledger file, every 0.5 s: the no-Redis default) and
``redis`` (the store announces each change on Redis and the server swaps on the event), when
Redis answers at ``--redis-url``; both serve ``continual`` from the engine's weights (the default,
``LAMINA_CONTINUAL_SERVING=weights``: a swap drains running requests, writes W0 + ΔW and loads
the corrections), and ``redis-lora`` is ``redis`` with the merge served as a LoRA adapter instead
(a swap loads one adapter beside the running ones). The server logs each weights swap's drain and
write times, which the report collects (``weights_swaps``). The comparison: publish, then restart the server (Ctrl-C,
start a new one on the same port and store), with the clients still running — time from the
publish to the first answer from the new version, and the requests that failed in between.
Prints a table and writes ``bench/results/swap.{json,md}``. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import redis  # noqa: E402

from bench import serving_common as common  # noqa: E402
from bench.report import RESULTS, envelope, markdown_table, report_head, write_result  # noqa: E402
from bench.serve.client import (  # noqa: E402
    PROMPTS,
    RequestResult,
    completion_body,
    http_client,
    loop_until,
    percentiles,
)
from server.processes import free_port, lamina_env, start_server  # noqa: E402
from server.swap.registry import CONTINUAL  # noqa: E402


@dataclass
class Publish:
    """One new version: when it was published and, for a restart, when the servers changed."""

    merge: str
    fingerprint: str  # what answers from it carry: the engine adapter name of the new merge
    started: float  # publish called (perf_counter seconds)
    published: float  # publish returned: the ledger names the new merge
    restart: bool = False
    stop_sent: float | None = None  # restart: Ctrl-C sent to the old server
    ready: float | None = None  # restart: the new server answered /ready


@dataclass
class Session:
    """Everything one server configuration (one mode) produced."""

    mode: str
    results: list[RequestResult]
    publishes: list[Publish]
    hot_phase: tuple[float, float]  # from the end of the warm-up to the last hot publish settling
    start_s: float


# --- the run ---------------------------------------------------------------------------------------


class Publisher:
    """Publishes synthetic tasks into the server's store, one new task (and merge) per call."""

    def __init__(
        self,
        store_root: Path,
        model_dir: Path,
        task_rank: int,
        redis_url: str | None,
        shared: common.SharedStore | None = None,
    ) -> None:
        self.store = common.open_store(store_root, model_dir, redis_url, shared)
        self.shapes = common.target_shapes(model_dir)
        self.task_rank = task_rank
        self.count = 0

    def publish_one(self) -> Publish:
        started = time.perf_counter()
        publication = common.publish_random(
            self.store, f"t{self.count}", self.shapes, self.task_rank, self.count, "lori-d", "concat"
        )
        self.count += 1
        merge = publication.merge.id
        return Publish(merge, f"{CONTINUAL}@{merge}", started, time.perf_counter())


def client_body(max_tokens: int):  # type: ignore[no-untyped-def]
    def body(i: int) -> dict[str, Any]:
        return completion_body(CONTINUAL, PROMPTS[i % len(PROMPTS)], max_tokens, seed=i)

    return body


async def run_session(args: argparse.Namespace, mode: str, work: Path, restarts: int) -> Session:
    """Start a server for ``mode``, load it, publish under load, then (optionally) restart."""
    model_dir = common.base_model_dir()
    redis_url = args.redis_url if mode.startswith("redis") else None
    home = work / mode
    publisher = Publisher(home / "store", model_dir, args.task_rank, redis_url)
    for _ in range(args.initial_tasks):
        publisher.publish_one()
    total_rank = args.task_rank * (args.initial_tasks + args.publishes + restarts)
    settings: dict[str, Any] = {**args.settings, "max_lora_rank": common.lora_slot(total_rank)}
    settings["continual_serving"] = "lora" if mode.endswith("-lora") else "weights"
    if redis_url:
        settings["redis_url"] = redis_url
    env = lamina_env(home, home / "store", **settings)
    port = free_port()
    print(f"== {mode}: starting server ({settings}) ...", flush=True)
    server = await asyncio.to_thread(
        start_server, env, home / "server-1.log", name=f"swap-{mode}", port=port, cwd=REPO
    )
    start_s = server.started_s
    results: list[RequestResult] = []
    publishes: list[Publish] = []
    stop = asyncio.Event()
    try:
        async with http_client(args.clients + 1) as client:
            loops = [
                asyncio.create_task(
                    loop_until(client, server.url, client_body(args.max_tokens), stop, results)
                )
                for _ in range(args.clients)
            ]
            loops.append(asyncio.create_task(loop_until(client, server.url, client_body(1), stop, results)))
            await asyncio.sleep(args.warmup)
            hot_start = time.perf_counter()
            for _ in range(args.publishes):
                await asyncio.sleep(args.interval)
                publishes.append(await asyncio.to_thread(publisher.publish_one))
                print(f"  published {publishes[-1].merge}", flush=True)
            await asyncio.sleep(args.interval)
            hot_end = time.perf_counter()
            for _ in range(restarts):
                publish = await asyncio.to_thread(publisher.publish_one)
                publish.restart = True
                publish.stop_sent = time.perf_counter()
                print(f"  published {publish.merge}; restarting the server ...", flush=True)
                await asyncio.to_thread(server.stop)
                log = home / f"server-{sum(p.restart for p in publishes) + 2}.log"
                server = await asyncio.to_thread(
                    start_server, env, log, name=f"swap-{mode}", port=port, cwd=REPO
                )
                publish.ready = time.perf_counter()
                publishes.append(publish)
                await asyncio.sleep(args.interval)
            stop.set()
            await asyncio.gather(*loops)
    finally:
        await asyncio.to_thread(server.stop)
    return Session(mode, results, publishes, (hot_start, hot_end), start_s)


# --- analysis --------------------------------------------------------------------------------------


def first_answer(results: list[RequestResult], fingerprint: str) -> float | None:
    """When the first text of an answer from ``fingerprint`` reached a client."""
    return min(
        (r.first for r in results if r.ok and r.first is not None and r.fingerprint == fingerprint),
        default=None,
    )


def stale_answers(results: list[RequestResult], publishes: list[Publish]) -> int:
    """Requests sent after a newer version had answered someone, yet served by an older one."""
    order = {p.fingerprint: i for i, p in enumerate(publishes)}
    seen = [(first_answer(results, p.fingerprint), i) for i, p in enumerate(publishes)]
    stale = 0
    for r in results:
        if not r.ok:
            continue
        newest = max((i for when, i in seen if when is not None and when < r.sent), default=-1)
        if order.get(r.fingerprint or "", -1) < newest:
            stale += 1
    return stale


def gaps_near(
    results: list[RequestResult], starts: list[float], window: float
) -> tuple[list[float], list[float]]:
    """Inter-chunk gaps ending within ``window`` s after any of ``starts``, and all the others."""
    near, far = [], []
    for r in results:
        for before, after in zip(r.chunks, r.chunks[1:], strict=False):
            hit = any(s <= after <= s + window for s in starts)
            (near if hit else far).append(after - before)
    return near, far


def longest_gap(times: list[float]) -> float | None:
    """The longest stretch in which no client got the first token of an answer."""
    return max((b - a for a, b in zip(times, times[1:], strict=False)), default=None)


def in_window(results: list[RequestResult], start: float, end: float) -> list[RequestResult]:
    return [r for r in results if start <= r.sent <= end]


def analyse_hot(session: Session, window: float) -> dict[str, Any]:
    """The hot publishes: requests sent from the end of the warm-up to the end of the hot phase,
    less those a restart's Ctrl-C cut off (those are the restart's)."""
    hot = [p for p in session.publishes if not p.restart]
    start, end = session.hot_phase
    cutoff = min((p.stop_sent for p in session.publishes if p.stop_sent is not None), default=float("inf"))
    during = [r for r in in_window(session.results, start, end) if r.ok or r.done < cutoff]
    latencies = [first_answer(session.results, p.fingerprint) for p in hot]
    swap_s = [f - p.published for f, p in zip(latencies, hot, strict=True) if f is not None]
    near, far = gaps_near(during, [p.published for p in hot], window)
    return {
        "publishes": len(hot),
        "never_answered": sum(f is None for f in latencies),
        "publish_to_first_answer_s": percentiles(swap_s, (50, 95, 100), scale=1.0),
        "publish_to_first_answer_s_each": swap_s,
        "publish_call_s": percentiles([p.published - p.started for p in hot], (50, 95, 100), scale=1.0),
        "requests": len(during),
        "longest_no_answer_s": longest_gap(sorted(r.first for r in during if r.ok and r.first is not None)),
        "failed": sum(not r.ok for r in during),
        "errors": sorted({r.error for r in during if r.error})[:5],
        "mixed_versions": sum(r.mixed for r in during),
        "stale_answers": stale_answers(during, session.publishes),
        "itl_ms_near_publish": {**percentiles(near, (50, 99, 100)), "n": len(near)},
        "itl_ms_elsewhere": {**percentiles(far, (50, 99, 100)), "n": len(far)},
    }


def analyse_restarts(session: Session) -> list[dict[str, Any]]:
    out = []
    for p in (p for p in session.publishes if p.restart):
        assert p.stop_sent is not None
        first = first_answer(session.results, p.fingerprint)
        after_stop = [r for r in session.results if r.done >= p.stop_sent]
        back = min((r.first for r in after_stop if r.ok and r.first and r.sent >= p.stop_sent), default=None)
        failed = [r for r in after_stop if not r.ok and (back is None or r.sent <= back)]
        out.append(
            {
                "merge": p.merge,
                "publish_to_first_answer_s": None if first is None else first - p.published,
                "stop_to_ready_s": None if p.ready is None else p.ready - p.stop_sent,
                "unavailable_s": None if back is None else back - p.stop_sent,
                "failed": len(failed),
                "failed_in_flight_at_stop": sum(r.sent < p.stop_sent for r in failed),
                "errors": sorted({(r.error or "")[:120] for r in failed})[:5],
                "mixed_versions": sum(r.mixed for r in after_stop),
            }
        )
    return out


# --- reporting --------------------------------------------------------------------------------------


def _s(figures: dict[str, float | None]) -> str:
    return " / ".join("-" if v is None else f"{v:.2f}" for v in figures.values())


def _ms(figures: dict[str, Any]) -> str:
    return " / ".join("-" if figures[k] is None else f"{figures[k]:.0f}" for k in ("p50", "p99", "p100"))


def table(result: dict[str, Any]) -> str:
    headers = [
        "how", "versions", "publish → first new answer s p50/p95/max", "longest no-answer s", "failed",
        "mixed", "stale", "requests", "ITL ms p50/p99/max near publish", "elsewhere",
    ]  # fmt: skip
    rows = []
    for mode, hot in result["hot_swap"].items():
        rows.append([
            f"hot swap ({mode})", hot["publishes"], _s(hot["publish_to_first_answer_s"]), hot["longest_no_answer_s"],
            hot["failed"],
            hot["mixed_versions"], hot["stale_answers"], hot["requests"], _ms(hot["itl_ms_near_publish"]),
            _ms(hot["itl_ms_elsewhere"]),
        ])  # fmt: skip
    for restart in result["restarts"]:
        first = restart["publish_to_first_answer_s"]
        rows.append([
            f"restart ({restart['mode']})", 1, "-" if first is None else f"{first:.2f}", restart["unavailable_s"],
            restart["failed"], restart["mixed_versions"], "-", "-", "-", "-",
        ])  # fmt: skip
    return markdown_table(headers, rows)


def markdown(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [
        *report_head("bench/swap", result),
        f"{c['clients']} clients streaming `model=continual` (max_tokens {c['max_tokens']}) + 1 one-token probe, "
        f"back to back; {c['publishes']} publishes {c['interval']} s apart per mode. `stale` = answers from an "
        "older version to requests sent after the new one had answered. ITL 'near publish' = gaps ending "
        f"within {c['stall_window']} s after a publish.",
        "",
        table(result),
    ]
    for restart in result["restarts"]:
        lines += [
            "",
            f"Restart ({restart['mode']}): Ctrl-C → new server ready {restart['stop_to_ready_s']:.1f} s; "
            f"no answers for {restart['unavailable_s']:.1f} s; {restart['failed']} requests failed "
            f"({restart['failed_in_flight_at_stop']} of them in flight at the Ctrl-C; clients retry after 0.1 s).",
        ]
    for mode, session in result.get("sessions", {}).items():
        swaps = session.get("weights_swaps") or []
        if swaps:
            write = percentiles([w["write_s"] for w in swaps], (50, 100), scale=1.0)
            total = percentiles([w["swap_s"] for w in swaps], (50, 100), scale=1.0)
            drain = percentiles([w["drain_s"] for w in swaps], (50, 100), scale=1.0)
            lines += [
                "",
                f"Weights swaps ({mode}, {len(swaps)}, server log): write W0 + ΔW p50/max {_s(write)} s, "
                f"drain {_s(drain)} s, whole swap {_s(total)} s; requests still running at a write: "
                f"{sum(w['still_running'] for w in swaps)}.",
            ]
    if result.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(result["skipped"])]
    return "\n".join(lines) + "\n"


_SWAP_LINE = re.compile(
    r"weights now hold (\S+): swap ([\d.]+) s \(drain ([\d.]+) s, write ([\d.]+) s, (\d+) requests"
)


def weights_swaps(home: Path) -> list[dict[str, Any]]:
    """The weights swaps the servers under ``home`` logged (server/swap/weights.py), in order."""
    swaps = []
    for log in sorted(home.glob("server-*.log")):
        for match in _SWAP_LINE.finditer(log.read_text(errors="replace")):
            merge, total, drain, write, running = match.groups()
            swaps.append(
                {"merge": merge, "swap_s": float(total), "drain_s": float(drain), "write_s": float(write),
                 "still_running": int(running)}
            )  # fmt: skip
    return swaps


def redis_reachable(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4, help="streaming clients (plus one probe)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--publishes", type=int, default=6, help="hot publishes per mode")
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between publishes")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--initial-tasks", type=int, default=1)
    parser.add_argument("--task-rank", type=int, default=4, help="rank of each published task")
    parser.add_argument("--restarts", type=int, default=1, help="restart comparisons (on the last mode)")
    parser.add_argument(
        "--modes", nargs="+", default=["poll", "redis", "redis-lora"], choices=["poll", "redis", "redis-lora"]
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--stall-window", type=float, default=2.0)
    common.add_server_arguments(parser)
    parser.add_argument("--out", type=Path, default=RESULTS / "swap.json")
    args = common.parse_server_arguments(parser)
    result = run(args)
    print(table(result))
    write_result(result, args.out, markdown(result))


def run(args: argparse.Namespace) -> dict[str, Any]:
    result = envelope("swap", {k: v for k, v in vars(args).items() if k not in ("out", "work")})
    modes = list(args.modes)
    skipped = []
    if any(m.startswith("redis") for m in modes) and not redis_reachable(args.redis_url):
        skipped += [f"{m} mode: no Redis at {args.redis_url}" for m in modes if m.startswith("redis")]
        modes = [m for m in modes if not m.startswith("redis")]
    result["hot_swap"], result["restarts"], result["sessions"] = {}, [], {}
    with tempfile.TemporaryDirectory(prefix="lamina-swap-bench-") as tmp:
        work = args.work or Path(tmp)
        for i, mode in enumerate(modes):
            restarts = args.restarts if i == len(modes) - 1 else 0
            session = asyncio.run(run_session(args, mode, work, restarts))
            result["hot_swap"][mode] = analyse_hot(session, args.stall_window)
            result["restarts"] += [{"mode": mode, **r} for r in analyse_restarts(session)]
            result["sessions"][mode] = {
                "server_start_s": session.start_s,
                "weights_swaps": weights_swaps(work / mode),
                "publishes": [asdict(p) for p in session.publishes],
                "requests": len(session.results),
            }
            print(f"  {mode}: {result['hot_swap'][mode]}", flush=True)
    result["skipped"] = skipped
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    return result


if __name__ == "__main__":
    main()
