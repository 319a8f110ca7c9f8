"""The inference engine: a thin layer over vLLM's ``AsyncLLM``.

Everything that touches vLLM's API lives here, so the rest of the server deals in prompts,
sampling parameters, adapter paths and weight files; nothing else holds the ``AsyncLLM``. vLLM
runs its engine core and model worker in child processes; ``shutdown`` must run on every exit
path or they outlive the server. What runs inside the worker process (writing dense weights) is
server/vllm_weights.py, which vLLM imports there by name.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from server.settings import ServerSettings
from server.vllm_weights import APPLY_METHOD, PROBE_METHOD, WORKER_EXTENSION

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
            # Adds Lamina's dense-weight writer to vLLM's worker (server/vllm_weights.py).
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

    def _started(self) -> AsyncLLM:
        if self._llm is None:
            raise RuntimeError("the engine is not started")
        return self._llm

    def check(self, params: SamplingParams) -> None:
        """vLLM's own checks of ``params`` against the model (logprobs, logit_bias, stop and
        allowed token ids, a structured output's grammar), which the engine otherwise runs only
        once the request is submitted; on a copy, as they record the grammar backend chosen."""
        llm = self._started()
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
        return self._started().generate(prompt, params, request_id, lora_request=_lora_request(adapter))

    async def add_adapter(self, adapter: AdapterHandle) -> None:
        request = _lora_request(adapter)
        assert request is not None
        if not await self._started().add_lora(request):
            raise RuntimeError(f"vLLM refused adapter {adapter.name} from {adapter.path}")

    async def remove_adapter(self, adapter: AdapterHandle) -> None:
        await self._started().remove_lora(adapter.lora_id)

    async def reset_prefix_cache(self, reset_running_requests: bool = False) -> None:
        """Drop every cached KV block; with ``reset_running_requests`` also preempt the running
        requests, which are then recomputed from their prompts (their blocks are dropped too)."""
        if not await self._started().reset_prefix_cache(reset_running_requests=reset_running_requests):
            raise RuntimeError("vLLM could not reset its prefix cache")

    async def apply_dense_delta(self, base_model_dir: Path, delta_path: Path | None) -> float:
        """Make the engine serve W0 + ΔW, or exactly W0 again when ``delta_path`` is None;
        returns the seconds it took.

        ``base_model_dir`` is the directory the engine loaded (W0 is read from its safetensors);
        ``delta_path`` is a ``delta.safetensors`` written by ``DenseDelta.save``, or a LoRA merge's
        directory in PEFT layout (ΔW = scale · B @ A, formed in the worker). Every module changed
        by an earlier call and absent from this delta goes back to W0, so the engine always serves
        W0 + (the latest ΔW). The worker checks the delta against the model (names, shapes) before
        it writes any weight (server/vllm_weights.py). Requests still running are preempted and
        recomputed with the new weights (the hot-swap drains them first, server/swap/weights.py),
        and the prefix cache is emptied, since cached KV blocks were computed with the old ones.
        """
        started = time.perf_counter()
        args = (
            str(Path(base_model_dir).resolve()),
            None if delta_path is None else str(Path(delta_path).resolve()),
        )
        written = await self._started().collective_rpc(APPLY_METHOD, args=args)
        await self.reset_prefix_cache(reset_running_requests=True)
        what = f"W0 + ΔW of {delta_path}" if delta_path else "base weights (rollback)"
        seconds = time.perf_counter() - started
        log.info("engine now serves %s: %d modules written in %.3f s", what, len(written[0]), seconds)
        return seconds

    async def probe_linear(self, module: str, probe: list[float]) -> list[float]:
        """``W @ probe`` computed by the engine's own kernel for the vLLM module ``module``
        (e.g. ``model.layers.0.self_attn.qkv_proj``): reads back the weight the engine really
        uses, including a packed CPU copy. For tests and diagnostics; with tensor parallelism it
        returns the first worker's shard."""
        results = await self._started().collective_rpc(PROBE_METHOD, args=(module, probe))
        return list(results[0])


def _lora_request(adapter: AdapterHandle | None) -> LoRARequest | None:
    if adapter is None:
        return None
    from vllm.lora.request import LoRARequest

    return LoRARequest(adapter.name, adapter.lora_id, adapter.path)
