"""The server's settings: one object, read from ``LAMINA_*`` environment variables once at
start-up and passed explicitly from there on (nothing deeper reads the environment)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_base_model_dir() -> Path:
    """The embedded model shipped inside the ``trainer`` package (found without importing it,
    so the API process never pulls in torch training code)."""
    spec = importlib.util.find_spec("trainer")
    assert spec is not None and spec.submodule_search_locations, "the trainer package is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / "base_model" / "weights" / "lamina-tiny"


# vLLM accepts only these LoRA ranks as its slot size (vllm/config/lora.py).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class ServerSettings(BaseSettings):
    """Everything the API process needs to know, each field documented and validated here."""

    model_config = SettingsConfigDict(env_prefix="LAMINA_", extra="ignore")

    model: Path = Field(
        default_factory=default_base_model_dir,
        description="Directory of the base model (Hugging Face layout). Defaults to the embedded model.",
    )
    base_model_name: str = Field(
        "base", description="The `model` value clients use for the base model without adapters."
    )
    host: str = Field("127.0.0.1", description="Interface uvicorn binds to.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port uvicorn binds to (0 = any free port).")
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
    max_lora_rank: int = Field(64, description="Largest adapter rank the engine can serve.")
    max_loras: int = Field(8, ge=1, description="Adapters that can be active in one batch.")
    max_tokens_limit: int = Field(
        4096, ge=1, description="Upper bound a single request may ask for in max_tokens."
    )

    @field_validator("max_lora_rank")
    @classmethod
    def _rank_is_a_vllm_slot(cls, value: int) -> int:
        if value not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {VLLM_LORA_RANKS}")
        return value
