"""The registry's swap barrier (ModelRegistry.exclusive): a weights swap waits for the requests
already running and holds new ones back, so every request runs on the weights it resolved."""

from __future__ import annotations

import asyncio

from server.swap.registry import ModelRegistry


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


def test_a_swap_gives_up_waiting_after_drain_s_and_says_how_many_still_run(monkeypatch) -> None:
    monkeypatch.setattr("server.swap.registry.REVOKE_GRACE_S", 0.05)  # this request never stops

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


def test_a_request_that_outlasts_the_drain_ends_with_model_swapped_not_on_the_new_weights() -> None:
    """Before, the swap wrote the new weights under it and it finished as no model at all
    (W0 + ΔW_new − ΔW_old for a base or task request), labelled with the old version."""
    from types import SimpleNamespace

    from server.errors import APIError
    from server.openai.preparing import Prepared
    from server.openai.running import run_pieces

    class EndlessEngine:  # one token every 10 ms, forever: a very long answer
        def generate(self, prompt, params, request_id, adapter):  # noqa: ANN001, ANN201
            async def outputs():  # noqa: ANN202
                for i in range(10_000):
                    await asyncio.sleep(0.01)
                    sample = SimpleNamespace(
                        index=0, text="x", token_ids=[i], logprobs=None, finish_reason=None
                    )
                    yield SimpleNamespace(outputs=[sample])

            return outputs()

    async def scenario() -> tuple[int, int, str, int]:
        registry, tokens, outcome = ModelRegistry("base"), [], []

        async def long_request() -> None:
            async with registry.request("base") as route:
                prepared = Prepared([[1, 2, 3]], SimpleNamespace(n=1))  # type: ignore[arg-type]
                try:
                    async for piece in run_pieces(EndlessEngine(), route, prepared, 1, "r", None):  # type: ignore[arg-type]
                        tokens.extend(piece.token_ids)
                except APIError as error:
                    outcome.append(error.code or "")

        running = asyncio.create_task(long_request())
        await asyncio.sleep(0.05)
        async with registry.exclusive(drain_s=0.1) as revoked:
            during = len(tokens)  # the weights are written here
            still = registry.running
        await asyncio.sleep(0.05)
        await running
        assert len(tokens) == during, "no token may come after the swap began writing"
        return revoked, still, outcome[0], len(tokens)

    revoked, still, code, produced = asyncio.run(scenario())
    assert (revoked, still, code) == (1, 0, "model_swapped") and produced > 0
