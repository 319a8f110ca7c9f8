"""Which engine adapter answers a request's ``model`` field.

One resolver serves every endpoint: ``base`` (no adapter), a task name (that task's own
adapter) and ``continual`` (the live merge). Public names are aliases onto engine adapter
handles; a hot-swap points an alias at a new handle, and a handle that no alias points at
and no request holds any more can be unloaded from the engine.

When the live merge is written into the engine's weights, every route depends on those
weights (``base`` and tasks are corrections relative to them), so a weights swap is exclusive:
:meth:`ModelRegistry.exclusive` holds new requests back, waits for the running ones to finish,
and only then lets the swap write the weights and flip the routes. A request therefore runs
start to end on the weights and the adapter it resolved.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import StrEnum

from server.engine import AdapterHandle

log = logging.getLogger(__name__)
_DRAIN_POLL_S = 0.005


class ModelNotFound(LookupError):
    """The request named a model this server does not serve."""

    def __init__(self, name: str) -> None:
        super().__init__(f"The model `{name}` does not exist. GET /v1/models lists the served models.")
        self.name = name


CONTINUAL = "continual"
"""The public model name of the live merge of every task (its route's kind is ``RouteKind.continual``)."""


class RouteKind(StrEnum):
    """What answers for a public model name; ``GET /v1/models`` shows it as each model's ``kind``."""

    base = "base"  # the base model, no adapter
    task = "task"  # one learned task's own adapter, under the task's name
    continual = "continual"  # the live merge of every task


@dataclass(frozen=True)
class Route:
    """A public model name and what currently answers for it."""

    name: str
    adapter: AdapterHandle | None  # None: the base model's own weights
    kind: RouteKind
    in_weights: str | None = None  # served from the engine's weights with no adapter: what answers carry
    created: int = field(default_factory=lambda: int(time.time()))
    # None: served exactly; else the relative Frobenius error of the truncated SVD that serves it
    relative_error: float | None = None


class Lease:
    """One running request's hold on its route. A weights swap that gave up waiting for it
    revokes it: the request then ends with a clear error instead of finishing on weights that
    are no longer the model it named (:func:`server.openai.running.run_pieces` listens)."""

    def __init__(self) -> None:
        self.revoked = False
        self._listeners: list[Callable[[], None]] = []

    def on_revoke(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def revoke(self) -> None:
        if not self.revoked:
            self.revoked = True
            for listener in self._listeners:
                listener()


CURRENT_LEASE: ContextVar[Lease | None] = ContextVar("lamina_current_lease", default=None)
"""The lease of the request the current task serves (set by :meth:`ModelRegistry.request`)."""

REVOKE_GRACE_S = 5.0  # how long a swap waits for revoked requests to stop before it writes anyway


class ModelRegistry:
    """Alias table plus a count of in-flight requests per engine adapter."""

    def __init__(self, base_name: str) -> None:
        self.base_name = base_name
        self._routes: dict[str, Route] = {base_name: Route(base_name, None, RouteKind.base)}
        self._in_flight: Counter[int] = Counter()
        self._running = 0  # leases held now, whatever they resolved to
        self._open: asyncio.Event | None = None  # created on first use, in the serving loop
        self._leases: set[Lease] = set()  # requests running now, each revocable by a swap

    def routes(self) -> list[Route]:
        return list(self._routes.values())

    def resolve(self, name: str) -> Route:
        try:
            return self._routes[name]
        except KeyError:
            raise ModelNotFound(name) from None

    def set_route(self, route: Route) -> AdapterHandle | None:
        """Point ``route.name`` at a new adapter; returns the handle it pointed at before."""
        previous = self._routes.get(route.name)
        self._routes[route.name] = route
        return previous.adapter if previous else None

    def drop_route(self, name: str) -> AdapterHandle | None:
        previous = self._routes.pop(name, None)
        return previous.adapter if previous else None

    def replace_routes(self, routes: list[Route]) -> None:
        """Point every name in ``routes`` at its new adapter and drop the task routes not
        among them (a removed task), in one step the event loop does not interleave."""
        wanted = {r.name for r in routes}
        for route in routes:
            self._routes[route.name] = route
        for name, route in list(self._routes.items()):
            if route.kind is RouteKind.task and name not in wanted:
                del self._routes[name]

    @contextmanager
    def lease(self, name: str) -> Iterator[Route]:
        """Resolve ``name`` and hold its adapter for the duration of one request, so a
        hot-swap never unloads an adapter that a running request still decodes with."""
        route = self.resolve(name)
        lora_id = route.adapter.lora_id if route.adapter else None
        if lora_id is not None:
            self._in_flight[lora_id] += 1
        self._running += 1
        try:
            yield route
        finally:
            self._running -= 1
            if lora_id is not None:
                self._in_flight[lora_id] -= 1
                if self._in_flight[lora_id] <= 0:
                    del self._in_flight[lora_id]

    @asynccontextmanager
    async def request(self, name: str) -> AsyncIterator[Route]:
        """:meth:`lease` for a request: first waits while a weights swap is under way, so the
        route it resolves belongs to the weights it will run on."""
        open_ = self._gate()
        while not open_.is_set():
            await open_.wait()
        held = Lease()
        token = CURRENT_LEASE.set(held)
        self._leases.add(held)
        try:
            with self.lease(name) as route:
                yield route
        finally:
            self._leases.discard(held)
            CURRENT_LEASE.reset(token)

    @asynccontextmanager
    async def exclusive(self, drain_s: float) -> AsyncIterator[int]:
        """Hold new requests back and wait (at most ``drain_s``) until none is running. Requests
        still running then are revoked: each ends with a 503 ``model_swapped`` (in-band for a
        stream) rather than finishing on weights that are no longer its model. Yields how many
        were revoked (0 normally). Requests are let in again when the block ends, whether the
        swap inside succeeded or not."""
        open_ = self._gate()
        open_.clear()
        try:
            deadline = time.monotonic() + drain_s
            while self._running and time.monotonic() < deadline:
                await asyncio.sleep(_DRAIN_POLL_S)
            revoked = self._running
            if revoked:
                log.warning(
                    "%d requests still running after %.1f s; ending them (model_swapped) before the swap",
                    revoked, drain_s,
                )  # fmt: skip
                for held in list(self._leases):
                    held.revoke()
                grace = time.monotonic() + REVOKE_GRACE_S
                while self._running and time.monotonic() < grace:
                    await asyncio.sleep(_DRAIN_POLL_S)
            yield revoked
        finally:
            open_.set()

    @property
    def running(self) -> int:
        return self._running

    def _gate(self) -> asyncio.Event:
        if self._open is None:
            self._open = asyncio.Event()
            self._open.set()
        return self._open

    def in_use(self, adapter: AdapterHandle) -> bool:
        """True while an alias points at ``adapter`` or a request still holds it."""
        routed = any(r.adapter == adapter for r in self._routes.values())
        return routed or self._in_flight.get(adapter.lora_id, 0) > 0
