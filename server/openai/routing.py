"""``model="continual"`` routed by input: what answers a request sent to the continual model.

The hot-swap sync hands this object the live tasks' routing prototypes
(:mod:`adapters_store.routing`); a request for ``continual`` is then served by

- ``task`` (default, ``LAMINA_CONTINUAL_ROUTING``): the matching task's own model (``model=<task>``:
  for methods that train on top of the earlier tasks, the model as it was when that task was
  learned), otherwise the base model itself, so general prompts get the base's own answers and a
  task's prompts the model that learned it (nothing a later task did can move them); while a task
  that applies to every prompt is live, or the live merge is dense (its tasks' models are then
  truncated SVDs), the merge;
- ``merge``: the live merge when the prompt matches a learned task, otherwise the base;
- ``off``: the live merge for every prompt (the behaviour before routing).

The decision reads the request's text (a completion's prompt; a chat's system and user turns,
without the template) through the base model's input embeddings: a mean and a few dot products,
no forward pass, well under a millisecond on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters_store.routing import (
    MERGE,
    PromptEmbedder,
    Router,
    RoutingMode,
    destination,
    router_from_metas,
    routing_text,
)
from server.openai.protocol import AnyRequest, ChatCompletionRequest
from server.swap.registry import CONTINUAL

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


class ContinualRouter:
    """Holds the live tasks' router and turns a ``continual`` request into the name that serves it."""

    def __init__(
        self, mode: RoutingMode, base_name: str, model_dir: Path, tokenizer: PreTrainedTokenizerBase
    ) -> None:
        self.mode = mode
        self.base_name = base_name
        self._model_dir = model_dir
        self._tokenizer = tokenizer
        self._embedder: PromptEmbedder | None = None  # read on the first routed request
        self.router = Router({})
        self.tasks_exact = True  # whether a task's model is served exactly (see follow)

    def follow(self, metas: Mapping[str, Mapping[str, Any]], tasks_exact: bool = True) -> None:
        """The live tasks changed (a sync): route by their prototypes from now on.
        ``tasks_exact`` is False when the live merge is dense (PS-LoRA's magnitude merge): its
        tasks' models are then truncated SVDs, so ``task`` routing sends their prompts to the
        merge, which is served exactly."""
        self.router = router_from_metas(metas)
        self.tasks_exact = tasks_exact

    def served_name(self, request: AnyRequest, name: str) -> str:
        """The public name whose route answers ``request`` asked for ``name``."""
        if name != CONTINUAL or self.mode == "off" or not self.router.prototypes:
            return name
        decision = self.router.decide(self._vector(request).unsqueeze(0))[0]
        target = destination(decision, self.mode, self.tasks_exact)
        if target is None:
            return self.base_name
        return CONTINUAL if target == MERGE else target

    def _vector(self, request: AnyRequest) -> torch.Tensor:
        if self._embedder is None:
            self._embedder = PromptEmbedder.from_model_dir(self._model_dir, self._tokenizer)
        embedder = self._embedder
        if isinstance(request, ChatCompletionRequest):
            return embedder.embed([routing_text(messages=_turns(request.messages))])[0]
        prompt: Any = request.prompt  # a string, strings, token ids or lists of them
        if isinstance(prompt, str):
            return embedder.embed([routing_text(prompt)])[0]
        items = list(prompt or [])
        if items and all(isinstance(p, str) for p in items):
            return embedder.embed(["\n".join(items)])[0]
        ids = [int(i) for p in items for i in (p if isinstance(p, list) else [p])]  # token ids
        return embedder.embed_ids(ids)


def _turns(messages: Iterable[Any]) -> list[tuple[str, str]]:
    """(role, text) of chat messages as the request holds them (text parts of a list content)."""
    turns = []
    for message in messages:
        get = message.get if isinstance(message, Mapping) else lambda k, m=message: getattr(m, k, None)
        content = get("content")
        if isinstance(content, list):
            content = " ".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
        turns.append((str(get("role") or ""), content or ""))
    return turns
