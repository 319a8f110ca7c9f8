"""A streaming load generator for any OpenAI-compatible ``/v1/completions`` endpoint.

Closed loop, like ``vllm bench serve --max-concurrency``: ``concurrency`` clients each take the
next request from a fixed list as soon as their previous one ends, so every configuration does
exactly the same work and the numbers compare. Each request streams (server-sent events) with
``stream_options.include_usage``, so the output-token count is the server's own, not a guess
from the number of chunks. Requests set vLLM's ``ignore_eos``, so every answer is
``max_tokens`` long and every configuration generates the same number of tokens.

Per request it records when it was sent, when each text chunk arrived, the token count and every
``system_fingerprint`` it saw (Lamina's engine adapter version: a request whose chunks name two
versions mixed them). Times are ``time.perf_counter()`` seconds.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

# Fixed prompts in the embedded model's vocabulary (its corpus: topics, records, questions),
# chosen because that small model continues them for a while before its end-of-text token.
PROMPTS = (
    "Q: what is 2 + 3? A:",
    "The recipe for soup needs",
    "In the lab, the chemist",
    "My favourite dinner is",
    "The story begins:",
    "Q: What is the opposite of north? A:",
    "My friend likes the guitar more than the drum.",
    "The story of the chord began with a jazz.",
    "There was a pasta near the bread today.",
    "Q: What is the capital of Tubove? A:",
    "Everyone asked about the new violin.",
    "The team and the coach were on the list.",
    "Q: How many words are in 'red blue green'? A:",
    "276 is even.\n14 minus 11 is",
    "The galaxy and the planet were ready before the orbit.",
    "In alphabetical order: ball, inning, worm.",
)


@dataclass
class RequestResult:
    """One streamed request as the client saw it."""

    model: str
    sent: float
    first: float | None = None  # arrival of the first event with a choice (text or finish reason)
    chunks: list[float] = field(default_factory=list)  # arrival of each chunk that carried text
    finished: bool = False  # the stream ended with ``data: [DONE]``
    done: float = 0.0
    output_tokens: int = 0
    fingerprints: list[str] = field(default_factory=list)  # distinct values, in order of arrival
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finished

    @property
    def ttft(self) -> float | None:
        """Time to the first token's event (an answer whose first token is end-of-text has no
        text, only a finish reason; it still answered)."""
        return self.first - self.sent if self.first is not None else None

    @property
    def itl(self) -> list[float]:
        """Gaps between successive text chunks (what ``vllm bench serve`` calls ITL)."""
        return [b - a for a, b in zip(self.chunks, self.chunks[1:], strict=False)]

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: immune to chunks that carry several tokens."""
        if self.first is None or self.output_tokens < 2:
            return None
        return (self.done - self.first) / (self.output_tokens - 1)

    @property
    def mixed(self) -> bool:
        return len(self.fingerprints) > 1

    @property
    def fingerprint(self) -> str | None:
        return self.fingerprints[0] if self.fingerprints else None


def completion_body(model: str, prompt: str, max_tokens: int, seed: int) -> dict[str, Any]:
    """The request every client sends: sampled (temperature 1, fixed seed), exactly
    ``max_tokens`` long (``ignore_eos``), streamed, with the usage chunk."""
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 1.0,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def request_bodies(models: Sequence[str], count: int, max_tokens: int) -> list[dict[str, Any]]:
    """``count`` requests cycling through the prompts and through ``models`` (several models:
    adjacent requests use different adapters, so a batch mixes them)."""
    return [
        completion_body(models[i % len(models)], PROMPTS[i % len(PROMPTS)], max_tokens, seed=i)
        for i in range(count)
    ]


async def stream_one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> RequestResult:
    """Send one streaming completion and record its timeline; never raises (errors are data)."""
    result = RequestResult(model=body["model"], sent=time.perf_counter())
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:300]}"
                return result
            async for line in response.aiter_lines():
                _take_event(result, line, time.perf_counter())
        if not result.finished and result.error is None:
            result.error = "stream ended without data: [DONE]"
    except (httpx.HTTPError, OSError, ValueError) as error:
        result.error = f"{type(error).__name__}: {error}"
    finally:
        result.done = time.perf_counter()
    return result


def _take_event(result: RequestResult, line: str, now: float) -> None:
    if line == "data: [DONE]":
        result.finished = True
        return
    if not line.startswith("data: "):
        return
    event = json.loads(line[len("data: ") :])
    if "error" in event:
        result.error = f"error event: {event['error']}"
        return
    fingerprint = event.get("system_fingerprint")
    if fingerprint is not None and fingerprint not in result.fingerprints:
        result.fingerprints.append(fingerprint)
    if event.get("usage"):
        result.output_tokens = int(event["usage"]["completion_tokens"])
    choices = event.get("choices") or []
    if choices and result.first is None:
        result.first = now
    if any(choice.get("text") for choice in choices):
        result.chunks.append(now)
        if not event.get("usage"):
            result.output_tokens = max(result.output_tokens, len(result.chunks))


@dataclass
class LoadRun:
    """All requests of one closed-loop run and its wall-clock span."""

    results: list[RequestResult]
    started: float
    ended: float

    @property
    def wall_s(self) -> float:
        return self.ended - self.started


def http_client(concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0, connect=10.0))


async def run_load(url: str, bodies: list[dict[str, Any]], concurrency: int) -> LoadRun:
    """Send ``bodies`` with ``concurrency`` clients in a closed loop."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    results: list[RequestResult] = []
    async with http_client(concurrency) as client:

        async def worker() -> None:
            while not queue.empty():
                results.append(await stream_one(client, url, queue.get_nowait()))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        ended = time.perf_counter()
    return LoadRun(results, started, ended)


async def loop_until(
    client: httpx.AsyncClient,
    url: str,
    make_body: Callable[[int], dict[str, Any]],
    stop: asyncio.Event,
    sink: list[RequestResult],
    pause_after_error_s: float = 0.1,
) -> None:
    """One client streaming request after request until ``stop`` is set (the swap benchmark)."""
    i = 0
    while not stop.is_set():
        result = await stream_one(client, url, make_body(i))
        sink.append(result)
        i += 1
        if result.error is not None:
            await asyncio.sleep(pause_after_error_s)


# --- summaries ---------------------------------------------------------------------------------


def percentiles(values: Sequence[float], points: Sequence[int] = (50, 95, 99), scale: float = 1e3) -> dict:
    """``{"p50": …, …}`` in milliseconds (``scale``), None when there is no value."""
    if not values:
        return {f"p{p}": None for p in points}
    found = np.percentile(np.asarray(values, dtype=float), list(points))
    return {f"p{p}": float(v) * scale for p, v in zip(points, found, strict=True)}


def summarize(runs: Sequence[LoadRun]) -> dict[str, Any]:
    """Throughput and latency figures of one or more runs of the same configuration, pooled:
    throughput = all output tokens / the runs' summed wall time; latencies in ms."""
    results = [r for run in runs for r in run.results]
    wall_s = sum(run.wall_s for run in runs)
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "errors": [[error, n] for error, n in Counter(r.error for r in results if r.error).most_common(5)],
        "wall_s": wall_s,
        "output_tokens": tokens,
        "mean_output_tokens": tokens / len(ok) if ok else None,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "tokens_per_s_by_run": [
            sum(r.output_tokens for r in run.results if r.ok) / run.wall_s for run in runs
        ],
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else None,
        "ttft_ms": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": percentiles([gap for r in ok for gap in r.itl]),
        "tpot_ms": percentiles([r.tpot for r in ok if r.tpot is not None]),
        "fingerprints": dict(Counter(r.fingerprint or "-" for r in ok)),
        "mixed_versions": sum(r.mixed for r in results),
    }
