"""A running Lamina service for integration tests: the server, a real training worker
process, and helpers to post tasks and wait for them. Shared by the service, fault, replica and dense-serving tests."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import redis

from server import processes
from tests.support.backend import stack_env, stack_ledger
from tests.support.processes import REPO, RunningServer, start_server, stop_server

# Only a failing test waits this long: a 120-step job on the embedded model took over 240 s on
# this 2-core machine with benchmarks running beside the suite.
JOB_TIMEOUT_S = 600
TERMINAL = ("succeeded", "failed", "cancelled")
REDIS_URL = "redis://127.0.0.1:6379/0"  # the Redis the service tests share (the fault tests run their own)
# A small memorisation task: what is checked is that an adapter carries its task through the
# store, the merge and the hot-swap, so the prompts are the training prompts.
CODE_WORDS = [
    (f"Code word for {w}:", f" {c}")
    for w, c in [
        ("apple", "zulu"),
        ("river", "kilo"),
        ("stone", "echo"),
        ("cloud", "delta"),
        ("tiger", "lima"),
        ("piano", "oscar"),
    ]
]


@dataclass
class Stack:
    server: RunningServer
    worker: subprocess.Popen
    env: dict[str, str]
    home: Path

    @property
    def url(self) -> str:
        return self.server.url

    def ledger(self) -> list[dict]:
        return stack_ledger({"LAMINA_HOME": str(self.home), **self.env})


def require_redis(url: str = REDIS_URL) -> None:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError:
        pytest.fail(f"Redis is required at {url} for the integration tests")


@contextmanager
def running_stack(
    home: Path, settings: dict[str, str], broker_url: str = REDIS_URL, queue: str = "lamina-test"
) -> Iterator[Stack]:
    """A worker and a server on ``home`` and a queue of their own on ``broker_url`` (isolated
    from any other run), with the ``LAMINA_*`` ``settings``; on exit, stops the server and the
    worker the stack holds then (a test may have restarted either)."""
    env = {
        "LAMINA_HOME": str(home),
        "LAMINA_BROKER_URL": broker_url,
        "LAMINA_QUEUE": f"{queue}-{uuid.uuid4().hex[:8]}",
        **settings,
    }
    worker = start_worker(env, home / "worker.log")
    stack = Stack(start_server(env, home / "server.log"), worker, env, home)
    try:
        yield stack
    finally:
        stop_together(lambda: stop_server(stack.server), lambda: stop_worker(stack.worker))


def stop_together(*stops: Callable[[], object]) -> None:
    """Run each stop at once (each Ctrl-Cs its own process group and waits for it): a server's
    drain and a worker's shutdown overlap instead of adding up in every module's teardown."""
    with ThreadPoolExecutor(max_workers=len(stops)) as pool:
        for future in [pool.submit(stop) for stop in stops]:
            future.result()


def start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """The training worker in its own process group (so a test can kill all of it at once),
    its output appended to ``log_path``."""
    return processes.start_worker(stack_env(env), log_path, cwd=REPO).process


def stop_worker(worker: subprocess.Popen) -> None:
    """Ctrl-C the worker's group; kill what of it is still alive 30 s later."""
    processes.stop_process(worker, timeout_s=30)


def post_task(
    stack: Stack,
    name: str,
    examples: list[tuple[str, str]],
    method: str,
    hyperparameters: dict,
    **extra: object,
) -> httpx.Response:
    body = {
        "name": name,
        "method": method,
        "examples": [{"prompt": p, "completion": c} for p, c in examples],
        "hyperparameters": hyperparameters,
        **extra,
    }
    return httpx.post(f"{stack.url}/tasks", json=body, timeout=30)


def get_job(stack: Stack, job_id: str) -> dict:
    return httpx.get(f"{stack.url}/tasks/{job_id}", timeout=10).json()


def wait_for(
    stack: Stack, job_id: str, statuses: tuple[str, ...] = TERMINAL, timeout_s: float = JOB_TIMEOUT_S
) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = get_job(stack, job_id)
        if job["status"] in statuses:
            return job
        time.sleep(0.5)
    log = (stack.home / "worker.log").read_text()[-3000:]
    pytest.fail(f"job {job_id} still {job['status']} after {timeout_s} s; worker log:\n{log}")


def wait_until_served(stack: Stack, merge_id: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(f"{stack.url}/ready").json().get("live_merge") == merge_id:
            return
        time.sleep(0.2)
    pytest.fail(f"server never swapped to {merge_id}")


def answers(
    stack: Stack, model: str, examples: list[tuple[str, str]], max_tokens: int = 4, stop: str | None = "\n"
) -> list[str]:
    """Greedy answers of ``model`` to the examples' prompts (up to ``stop``, when given)."""
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    result = client.completions.create(
        model=model,
        prompt=[p for p, _ in examples],
        max_tokens=max_tokens,
        temperature=0,
        stop=[stop] if stop is not None else None,
    )
    return [c.text for c in sorted(result.choices, key=lambda c: c.index)]


def served_models(stack: Stack) -> set[str]:
    return {m["id"] for m in httpx.get(f"{stack.url}/v1/models").json()["data"]}


# Short training that still learns the small memorisation tasks on the embedded model.
HYPERPARAMETERS = {"steps": 120, "learning_rate": 0.005, "batch_size": 6, "r": 8, "seed": 0}


def accuracy(stack: Stack, model: str, examples: list[tuple[str, str]]) -> float:
    got = answers(stack, model, examples)
    return sum(g.strip().split(" ")[0] == c.strip() for g, (_, c) in zip(got, examples, strict=True)) / len(
        examples
    )
