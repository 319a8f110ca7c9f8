"""Do posted tasks slow the streams? Inter-token latency with and without tasks being posted.

    .venv/bin/python bench/posting/run.py                   # ~3 min on 2 cores
    .venv/bin/python bench/posting/run.py --phase-s 10 --rounds 1   # a quick look

``POST /tasks`` parses and validates the examples, hashes them, takes the job board's lock, writes
the job and sends it to the broker; the fine-tuning routes do the same. All of that runs off the
server's event loop (a thread), so the streams the same loop serves should not notice. This
measures it: ``--clients`` clients stream ``base`` completions back to back on a real server
(``python -m server serve``, the embedded model unless ``--model``), in alternating phases of
``--phase-s`` seconds: *quiet*, then *posting*, where one more client posts tasks back to back
(``--examples`` examples each, every other one as a JSONL upload; one every ``--interval-s``,
or back to back with 0). No worker runs, so the jobs
stay queued and only the API's share of a task is measured. A gap between two chunks of a stream
counts in the phase it ended in. Prints a table and writes ``bench/results/posting.{json,md}``.
Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.provenance import load_average  # noqa: E402
from bench.report import RESULTS, envelope, markdown_table, report_head, write_result  # noqa: E402
from bench.serve.client import (  # noqa: E402
    PROMPTS,
    RequestResult,
    completion_body,
    http_client,
    loop_until,
    percentiles,
)
from server.processes import lamina_env, running, start_server  # noqa: E402

PHASES = ("quiet", "posting")


def task_examples(count: int, seed: int) -> list[dict[str, str]]:
    return [
        {"prompt": f"Code for item {seed}-{i}:", "completion": f" c{(seed * 7919 + i) % 10007}"}
        for i in range(count)
    ]


def post_tasks(url: str, examples: int, interval_s: float, duration_s: float, results: Connection) -> None:
    """In a process of its own (so building and sending the bodies costs the streaming client
    nothing): post a task every ``interval_s`` (0: back to back) for ``duration_s``, JSON bodies
    and JSONL uploads in turn; send back ``[(seconds, status), ...]``."""
    posted: list[tuple[float, int]] = []
    deadline = time.perf_counter() + duration_s
    with httpx.Client(timeout=60) as client:
        i = 0
        while time.perf_counter() < deadline:
            rows = task_examples(examples, i)
            name = f"post-{os.getpid()}-{i}"
            started = time.perf_counter()
            if i % 2 == 0:
                response = client.post(f"{url}/tasks", json={"name": name, "examples": rows})
            else:
                upload = "\n".join(json.dumps(row) for row in rows).encode()
                response = client.post(
                    f"{url}/tasks", data={"name": name}, files={"file": ("task.jsonl", upload)}
                )
            posted.append((time.perf_counter() - started, response.status_code))
            if response.status_code != 202 and sum(s == response.status_code for _, s in posted) == 1:
                print(f"refused ({response.status_code}): {response.text[:300]}")
            time.sleep(max(0.0, interval_s - posted[-1][0]))
            i += 1
    results.send(posted)


async def phase(url: str, name: str, args: argparse.Namespace, round_: int) -> dict[str, Any]:
    stop = asyncio.Event()
    streams: list[RequestResult] = []
    poster: multiprocessing.Process | None = None
    receive, send = multiprocessing.Pipe(duplex=False)

    def body(i: int) -> dict[str, Any]:
        return completion_body("base", PROMPTS[i % len(PROMPTS)], args.max_tokens, seed=i)

    async with http_client(args.clients) as client:
        started = time.perf_counter()
        tasks = [
            asyncio.create_task(loop_until(client, url, body, stop, streams)) for _ in range(args.clients)
        ]
        if name == "posting":
            poster = multiprocessing.Process(
                target=post_tasks, args=(url, args.examples, args.interval_s, args.phase_s, send)
            )
            poster.start()
        await asyncio.sleep(args.phase_s)
        stop.set()
        await asyncio.gather(*tasks)
        ended = started + args.phase_s
    posted: list[tuple[float, int]] = receive.recv() if poster is not None else []
    if poster is not None:
        poster.join()
    post_latencies = [seconds for seconds, _ in posted]
    statuses = [status for _, status in posted]
    # the gaps that ended inside the phase's window (streams still running at its end are cut there)
    gaps = [
        b - a for r in streams for a, b in zip(r.chunks, r.chunks[1:], strict=False) if started <= b <= ended
    ]
    tokens = sum(1 for r in streams for t in r.chunks if started <= t <= ended)
    return {
        "phase": name,
        "round": round_,
        "streams": len(streams),
        "failed": sum(not r.ok for r in streams),
        "tokens_per_s": tokens / args.phase_s,
        "itl_ms": percentiles(gaps),
        "itl_max_ms": max(gaps) * 1e3 if gaps else None,
        "posts": len(post_latencies),
        "posts_refused": sum(s != 202 for s in statuses),
        "post_ms": percentiles(post_latencies) if post_latencies else None,
    }


def pooled(records: list[dict[str, Any]], name: str) -> list[Any]:
    rows = [r for r in records if r["phase"] == name]
    p = lambda key, point: max(r[key][point] for r in rows if r[key] and r[key][point] is not None)  # noqa: E731
    posts = sum(r["posts"] for r in rows)
    return [
        name,
        sum(r["streams"] for r in rows),
        sum(r["failed"] for r in rows),
        sum(r["tokens_per_s"] for r in rows) / len(rows),
        p("itl_ms", "p95"),
        p("itl_ms", "p99"),
        max(r["itl_max_ms"] or 0.0 for r in rows),
        f"{posts} ({sum(r['posts_refused'] for r in rows)})",
        p("post_ms", "p50") if posts else None,
    ]


def markdown(result: dict[str, Any]) -> str:
    head = [
        "phase",
        "streams",
        "failed",
        "text chunks/s",
        "ITL p95 ms (worst round)",
        "ITL p99 ms (worst round)",
        "longest gap ms",
        "tasks posted (refused)",
        "post p50 ms",
    ]
    rows = [pooled(result["rounds"], name) for name in PHASES]
    lines = report_head("Streams while tasks are posted (bench/posting/run.py)", result)
    lines += [
        markdown_table(head, rows),
        "",
        "ITL: gaps between a stream's successive text chunks as the client received them (chunks that",
        "arrive in one network read count as a gap of ~0, so the median says little; read p95, p99 and",
        "the longest gap). Each phase's figures are the worst of its rounds.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=4, help="streaming clients")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--phase-s", type=float, default=20.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=3, help="quiet + posting pairs")
    parser.add_argument("--examples", type=int, default=200, help="examples per posted task")
    parser.add_argument(
        "--interval-s", type=float, default=0.5, help="seconds from one post to the next (0: back to back)"
    )
    parser.add_argument("--model", default=None, help="LAMINA_MODEL (default: the embedded model)")
    parser.add_argument("--out", type=Path, default=RESULTS / "posting.json")
    args = parser.parse_args()

    result = envelope("posting", {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
    with tempfile.TemporaryDirectory(prefix="lamina-posting-") as tmp:
        home = Path(tmp)
        # no worker takes the jobs: let them all queue (past LAMINA_MAX_PENDING_TASKS, 64 by default, it answers 429)
        settings: dict[str, object] = {"max_pending_tasks": 1_000_000}
        if args.model:
            settings["model"] = args.model
        env = lamina_env(home, **settings)
        with running(start_server(env, home / "server.log")) as server:
            records = []
            for round_ in range(args.rounds):
                for name in PHASES:
                    records.append(asyncio.run(phase(server.url, name, args, round_)))
                    print(json.dumps(records[-1]))
    result["rounds"] = records
    result["machine"]["load_average_at_end"] = load_average()
    text = markdown(result)
    print(text)
    write_result(result, args.out, text)


if __name__ == "__main__":
    main()
