"""The model resolver: public names -> engine adapters, with leases that keep an adapter
loaded while requests still use it."""

from __future__ import annotations

import pytest

from server.engine import AdapterHandle
from server.swap.registry import ModelNotFound, ModelRegistry, Route, RouteKind

V1 = AdapterHandle("continual@m1", 1, "/store/merges/m1")
V2 = AdapterHandle("continual@m2", 2, "/store/merges/m2")


def test_base_resolves_to_no_adapter() -> None:
    registry = ModelRegistry("base")
    assert registry.resolve("base").adapter is None
    assert [r.name for r in registry.routes()] == ["base"]


def test_unknown_name_raises_with_the_name() -> None:
    with pytest.raises(ModelNotFound, match="nope"):
        ModelRegistry("base").resolve("nope")


def test_set_route_returns_the_previous_adapter() -> None:
    registry = ModelRegistry("base")
    assert registry.set_route(Route("continual", V1, RouteKind.continual)) is None
    assert registry.set_route(Route("continual", V2, RouteKind.continual)) == V1
    assert registry.resolve(RouteKind.continual).adapter == V2


def test_lease_keeps_a_swapped_out_adapter_in_use_until_released() -> None:
    registry = ModelRegistry("base")
    registry.set_route(Route("continual", V1, RouteKind.continual))
    with registry.lease(RouteKind.continual) as route:
        assert route.adapter == V1
        registry.set_route(Route("continual", V2, RouteKind.continual))
        assert registry.in_use(V1), "a running request still decodes with v1"
    assert not registry.in_use(V1)
    assert registry.in_use(V2)


def test_lease_is_released_when_the_request_fails() -> None:
    registry = ModelRegistry("base")
    registry.set_route(Route("task-a", V1, RouteKind.task))
    with pytest.raises(RuntimeError), registry.lease("task-a"):
        raise RuntimeError("engine error")
    registry.drop_route("task-a")
    assert not registry.in_use(V1)


def test_replace_routes_flips_every_name_and_drops_removed_tasks_only() -> None:
    registry = ModelRegistry("base")
    registry.replace_routes(
        [
            Route("task-a", V1, RouteKind.task),
            Route("task-b", V1, RouteKind.task),
            Route("continual", V1, RouteKind.continual),
        ]
    )
    registry.replace_routes(
        [Route("task-a", V2, RouteKind.task), Route("continual", V2, RouteKind.continual)]
    )
    assert {r.name: r.adapter for r in registry.routes()} == {"base": None, "task-a": V2, "continual": V2}
    with pytest.raises(ModelNotFound):
        registry.resolve("task-b")
