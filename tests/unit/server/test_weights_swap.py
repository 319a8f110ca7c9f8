"""The registry's swap barrier (ModelRegistry.exclusive): a weights swap waits for the requests
already running and holds new ones back, so every request runs on the weights it resolved."""

from __future__ import annotations

import asyncio

from server.model_registry import ModelRegistry


async def _request(registry: ModelRegistry, tag: str, release: asyncio.Event, log: list) -> None:
    async with registry.request("base"):
        log.append(("start", tag))
        await release.wait()
        log.append(("end", tag))


def test_a_swap_waits_for_running_requests_and_holds_new_ones_back() -> None:
    async def scenario() -> list:
        registry, log = ModelRegistry("base"), []
        release_old, release_new = asyncio.Event(), asyncio.Event()
        old = asyncio.create_task(_request(registry, "old", release_old, log))
        await asyncio.sleep(0.01)

        async def swap() -> None:
            async with registry.exclusive(drain_s=5) as running:
                log.append(("swap", running))
                await asyncio.sleep(0.02)  # writing the weights
                log.append(("swapped", registry.running))

        swapping = asyncio.create_task(swap())
        await asyncio.sleep(0.01)
        new = asyncio.create_task(_request(registry, "new", release_new, log))
        await asyncio.sleep(0.05)
        assert ("start", "new") not in log, "a request arriving during the swap must wait for it"
        assert ("swap", 0) not in log, "the swap must wait for the running request"
        release_old.set()
        await swapping
        release_new.set()
        await asyncio.gather(old, new)
        return log

    assert asyncio.run(scenario()) == [
        ("start", "old"), ("end", "old"), ("swap", 0), ("swapped", 0), ("start", "new"), ("end", "new"),
    ]  # fmt: skip


def test_a_swap_gives_up_waiting_after_drain_s_and_says_how_many_still_run() -> None:
    async def scenario() -> tuple[int, int]:
        registry, log, never = ModelRegistry("base"), [], asyncio.Event()
        stuck = asyncio.create_task(_request(registry, "long", never, log))
        await asyncio.sleep(0.01)
        async with registry.exclusive(drain_s=0.05) as running:
            pass
        after = asyncio.create_task(_request(registry, "after", asyncio.Event(), log))
        await asyncio.sleep(0.01)  # the gate is open again
        started = sum(entry == ("start", "after") for entry in log)
        stuck.cancel()
        after.cancel()
        await asyncio.gather(stuck, after, return_exceptions=True)
        return running, started

    assert asyncio.run(scenario()) == (1, 1)


def test_a_failed_swap_still_lets_requests_in() -> None:
    async def scenario() -> int:
        registry = ModelRegistry("base")
        try:
            async with registry.exclusive(drain_s=1):
                raise RuntimeError("the weights could not be written")
        except RuntimeError:
            pass
        async with registry.request("base"):
            return registry.running

    assert asyncio.run(scenario()) == 1
