"""Running a prepared request on the engine: every prompt as vLLM requests, their outputs as
one stream of :class:`~server.openai.formats.Piece` deltas.

Its own module because whole answers and streams consume the same deltas; only what they do
with them differs (:mod:`server.openai.serving`). Here live the two things vLLM does not do
the way OpenAI's API needs: several prompts in one request, and ``n`` greedy choices (vLLM
refuses n > 1 without sampling, so they run as ``n`` single-sample copies).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from server.engine import Engine
from server.errors import APIError
from server.openai.formats import Piece
from server.openai.preparing import Prepared
from server.swap.registry import CURRENT_LEASE, Route

MODEL_SWAPPED = APIError(503, "model_swapped")  # sentinel put into a request's queue on revocation


async def run_pieces(
    engine: Engine, route: Route, prepared: Prepared, n: int, request_id: str, cache_salt: str | None
) -> AsyncIterator[Piece]:
    """Run every prompt as vLLM requests giving ``n`` samples each and yield their deltas
    as they arrive; choice index = prompt index · n + sample index."""
    from vllm.exceptions import VLLMClientError
    from vllm.inputs import TokensPrompt

    queue: asyncio.Queue[Piece | BaseException | None] = asyncio.Queue()
    params = prepared.params
    copies = n // params.n  # > 1 only for greedy requests, see RequestPreparer.prepare

    async def pump(first_index: int, token_ids: list[int], vllm_request_id: str) -> None:
        try:
            prompt = TokensPrompt(prompt_token_ids=token_ids)
            if cache_salt:
                prompt["cache_salt"] = cache_salt
            stream = engine.generate(prompt, params, vllm_request_id, route.adapter)  # type: ignore[arg-type]
            async for output in stream:
                for sample in output.outputs:
                    if sample.finish_reason == "error":
                        raise APIError(500, "the engine failed while generating.", type="server_error")
                    piece = Piece(
                        first_index + sample.index,
                        sample.text,
                        list(sample.token_ids),
                        list(sample.logprobs) if sample.logprobs is not None else None,
                        sample.finish_reason,
                    )
                    await queue.put(piece)
            await queue.put(None)
        except (VLLMClientError, ValueError) as error:  # the engine's own checks of the request
            await queue.put(APIError(400, str(error), param=getattr(error, "parameter", None)))
        except BaseException as exc:  # forwarded to the consumer, which re-raises
            await queue.put(exc)

    lease = CURRENT_LEASE.get()
    if lease is not None:  # a weights swap that gave up waiting ends this request cleanly
        lease.on_revoke(lambda: queue.put_nowait(MODEL_SWAPPED))
    tasks = [
        asyncio.create_task(pump(i * n + copy, ids, f"{request_id}-{i}-{copy}"))
        for i, ids in enumerate(prepared.prompts)
        for copy in range(copies)
    ]
    try:
        finished = 0
        while finished < len(tasks):
            item = await queue.get()
            if item is None:
                finished += 1
            elif item is MODEL_SWAPPED:
                raise APIError(
                    503,
                    "this request ran longer than LAMINA_WEIGHTS_SWAP_DRAIN_S while a new version went live; "
                    "it was ended rather than finished on weights that are no longer the model it named. Retry it.",
                    code="model_swapped",
                    type="server_error",
                )
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
