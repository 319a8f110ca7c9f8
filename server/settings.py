"""The API server's settings: the shared ``LaminaSettings`` plus what only the server needs."""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from trainer.contract.settings import LaminaSettings


class ServerSettings(LaminaSettings):
    """Everything the API process needs to know, each field documented and validated here."""

    base_model_name: str = Field(
        "base", description="The `model` value clients use for the base model without adapters."
    )
    host: str = Field("127.0.0.1", description="Interface uvicorn binds to.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port uvicorn binds to (0 = any free port).")
    drain_timeout_s: int = Field(
        30,
        ge=0,
        description="On SIGTERM or Ctrl-C the server stops accepting connections and lets requests in "
        "flight (streams included) finish for up to this many seconds; then it cuts what is left and "
        "shuts the engine down.",
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="Engine dtype. float32 is exact on any CPU; use bfloat16 on GPUs."
    )
    max_model_len: int = Field(512, ge=16, description="Context length (prompt + completion) in tokens.")
    kv_cache_fraction: float = Field(
        0.2,
        gt=0,
        le=0.95,
        description="vLLM's gpu_memory_utilization. On CPU it reserves this share of host memory.",
    )
    enforce_eager: bool = Field(True, description="Skip graph compilation (faster start, right for CPU).")
    max_loras: int = Field(8, ge=1, description="Adapters that can be active in one batch.")
    max_cpu_loras: int = Field(64, ge=1, description="Adapters the engine keeps loaded in host memory.")
    continual_serving: Literal["auto", "weights", "lora"] = Field(
        "auto",
        validation_alias=AliasChoices(
            "continual_serving", "LAMINA_CONTINUAL_SERVING", "LAMINA_DENSE_MERGE_SERVING"
        ),
        description="How the engine holds the models. `lora`: the engine's weights are the base model's, so "
        "`base` is exact at the base's speed, each task is its own adapter and the merge (`continual`) a LoRA "
        "adapter (a dense merge as its rank-max_lora_rank SVD). `weights`: W0 + ΔW_live written into the "
        "weights, so the merge runs at the base's speed, and `base` and each task become LoRA corrections "
        "relative to it, exact while their rank fits max_lora_rank. `auto` (default): `lora` while "
        "continual_routing is `task` (then general prompts go to the base and task prompts to the tasks' "
        "models, so those are the hot ones), `weights` otherwise. LAMINA_DENSE_MERGE_SERVING is the old "
        "name of this variable.",
    )
    weights_swap_drain_s: float = Field(
        60.0,
        ge=0,
        description="A weights swap holds new requests back and waits up to this long for running ones "
        "to finish, so each request runs on the weights it started with; a request still running after "
        "it is ended with a 503 model_swapped (in-band for a stream) rather than finished on weights that "
        "are no longer the model it named.",
    )
    ledger_poll_s: float = Field(
        0.5,
        gt=0,
        le=60,
        description="Seconds between the server's looks at the store's ledger. Without Redis this is how "
        "fast a replica follows a publish or rollback; with Redis, events swap at once and the poll only "
        "catches what an event missed.",
    )
    default_method: str = Field(
        "auto",
        description="Method of a POST /tasks that names none. auto: own-lora under task routing (each "
        "task learned as well as alone, nothing forgotten: its prompts go to its own model), inflora "
        "under merge or off routing (the merge answers, and inflora's merge keeps every task); "
        "docs/methods.md.",
    )
    max_tokens_limit: int = Field(
        4096, ge=1, description="Upper bound a single request may ask for in max_tokens."
    )
    max_request_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Largest request body (JSON or upload) accepted; 413 beyond."
    )
    max_file_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1,
        description="Largest file POST /v1/files stores (a fine-tuning JSONL); 413 naming `file` beyond. "
        "At most max_request_bytes, which would refuse the upload first.",
    )
    max_examples: int = Field(
        20_000, ge=1, description="Most training examples one task may have; 413 beyond."
    )
    admin_key: SecretStr | None = Field(
        None, description="Bearer key for /admin. None: the admin endpoints are disabled."
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated bearer keys for completions and training. Empty: those endpoints are "
        "open (the demo); set them in production.",
    )

    @property
    def serving_mode(self) -> Literal["weights", "lora"]:
        """``continual_serving`` with ``auto`` resolved (see its description)."""
        if self.continual_serving == "auto":
            return "lora" if self.continual_routing == "task" else "weights"
        return self.continual_serving

    @property
    def fallback_method(self) -> str:
        """``default_method`` with ``auto`` resolved (see its description)."""
        if self.default_method == "auto":
            return "own-lora" if self.continual_routing == "task" else "inflora"
        return self.default_method

    @model_validator(mode="after")
    def _file_fits_a_request(self) -> Self:
        if self.max_file_bytes > self.max_request_bytes:
            raise ValueError(
                f"max_file_bytes ({self.max_file_bytes}) is above max_request_bytes ({self.max_request_bytes}): "
                "such an upload would be refused as a request first"
            )
        return self

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value
