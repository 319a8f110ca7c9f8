"""The inference engine: a thin layer over vLLM's ``AsyncLLM``.

Everything that touches vLLM's API lives here, so the rest of the server deals in prompts,
sampling parameters and adapter paths. vLLM runs its engine core and model worker in child
processes; ``shutdown`` must run on every exit path or they outlive the server.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.dense_weights import WORKER_EXTENSION
from server.settings import ServerSettings

if TYPE_CHECKING:  # vLLM is heavy to import; only the engine process pays for it, once.
    from vllm import RequestOutput, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterHandle:
    """An adapter as the engine knows it: a unique name, a unique integer id, a path.

    vLLM caches prefix blocks per adapter name/id, so a published version is never loaded
    twice under the same name; every version gets a fresh handle."""

    name: str
    lora_id: int
    path: str


class Engine:
    """Owns one vLLM ``AsyncLLM`` for the life of the server process."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self._llm: AsyncLLM | None = None

    @property
    def ready(self) -> bool:
        return self._llm is not None and not self._llm.errored

    def start(self) -> None:
        """Build the engine (blocking, ~20 s on CPU with the tiny model; run it in a thread)."""
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        s = self.settings
        args = AsyncEngineArgs(
            model=str(s.model),
            dtype=s.dtype,
            max_model_len=s.max_model_len,
            gpu_memory_utilization=s.kv_cache_fraction,
            enforce_eager=s.enforce_eager,
            enable_lora=True,
            max_lora_rank=s.max_lora_rank,  # type: ignore[arg-type]  # validated in settings
            max_loras=s.max_loras,
            max_cpu_loras=max(s.max_cpu_loras, s.max_loras),
            # Adds Lamina's dense-weight writer to vLLM's worker (server/dense_weights.py).
            worker_extension_cls=WORKER_EXTENSION,
            # JSON outputs (response_format, forced tool calls) without free whitespace between
            # values: small models given it may write newlines until max_tokens (xgrammar: the
            # backend vLLM picks first; schemas it cannot compile are refused with a 400).
            structured_outputs_config=StructuredOutputsConfig(
                backend="xgrammar", disable_any_whitespace=True
            ),
            seed=0,
        )
        log.info("starting vLLM engine for %s", s.model)
        self._llm = AsyncLLM.from_engine_args(args)
        log.info("vLLM engine ready")

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    @property
    def llm(self) -> AsyncLLM:
        if self._llm is None:
            raise RuntimeError("the engine is not started")
        return self._llm

    def check(self, params: SamplingParams) -> None:
        """vLLM's own checks of ``params`` against the model (logprobs, logit_bias, stop and
        allowed token ids, a structured output's grammar), which the engine otherwise runs only
        once the request is submitted; on a copy, as they record the grammar backend chosen."""
        llm = self.llm
        copy.deepcopy(params).verify(
            llm.model_config,
            llm.vllm_config.speculative_config,
            llm.vllm_config.structured_outputs_config,
            llm.tokenizer,
        )

    def generate(
        self,
        prompt: str | TokensPrompt,
        params: SamplingParams,
        request_id: str,
        adapter: AdapterHandle | None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream vLLM outputs for one prompt; closing the iterator aborts the request."""
        return self.llm.generate(prompt, params, request_id, lora_request=_lora_request(adapter))

    async def add_adapter(self, adapter: AdapterHandle) -> None:
        request = _lora_request(adapter)
        assert request is not None
        if not await self.llm.add_lora(request):
            raise RuntimeError(f"vLLM refused adapter {adapter.name} from {adapter.path}")

    async def remove_adapter(self, adapter: AdapterHandle) -> None:
        await self.llm.remove_lora(adapter.lora_id)

    async def reset_prefix_cache(self) -> None:
        await self.llm.reset_prefix_cache()


def _lora_request(adapter: AdapterHandle | None) -> LoRARequest | None:
    if adapter is None:
        return None
    from vllm.lora.request import LoRARequest

    return LoRARequest(adapter.name, adapter.lora_id, adapter.path)
