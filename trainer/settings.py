"""Settings shared by the API server and the worker: where the base model, the store and the
broker are. One object, read from ``LAMINA_*`` environment variables once at start-up and
passed explicitly from there on. Imports nothing heavy: the API process uses it too.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from trainer.base_model.catalog import ModelNotInstalledError, resolve_model

# vLLM accepts only these LoRA ranks as its slot size (vllm/config/lora.py).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def default_base_model_dir() -> Path:
    """The embedded model shipped inside the ``trainer`` package (found without importing it)."""
    spec = importlib.util.find_spec("trainer")
    assert spec is not None and spec.submodule_search_locations, "the trainer package is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / "base_model" / "weights" / "lamina-tiny"


class LaminaSettings(BaseSettings):
    """What every Lamina process must agree on."""

    model_config = SettingsConfigDict(env_prefix="LAMINA_", extra="ignore")

    model: Path = Field(
        default_factory=default_base_model_dir,
        description="Base model: a directory (Hugging Face layout) or the name of a model installed with "
        "`lamina model install <name>` (found under <home>/models). Defaults to the embedded model.",
    )
    home: Path = Field(
        Path("var"),
        description="Local state: the store (unless `store` says otherwise) and the embedded broker's folders.",
    )
    store: Path | None = Field(None, description="The adapter store's root directory. Default: <home>/store.")
    broker_url: str | None = Field(
        None,
        description="Celery broker, e.g. redis://127.0.0.1:6379/0. None: kombu's filesystem transport "
        "under <home>/broker, so the demo needs no service.",
    )
    redis_url: str | None = Field(
        None,
        description="Redis for store events and the per-store training lock. Default: the broker URL "
        "when it is a Redis URL; None: servers poll the ledger and the lock is a file lock.",
    )
    queue: str = Field("lamina", description="Celery queue the API sends tasks to and the worker consumes.")
    max_lora_rank: int = Field(64, description="Largest adapter rank the engine can serve.")
    max_pending_tasks: int = Field(64, ge=1, description="Queued or running tasks allowed at once.")
    job_lease_s: float = Field(
        30.0,
        gt=0,
        description="A training job is claimed by one worker for this long and renewed while it "
        "runs; a job whose worker stops renewing (killed, lost) is failed after it lapses and the "
        "next task trains. Also the TTL of the store's Redis training lock.",
    )
    loraf_grow_rank: int = Field(
        0,
        ge=0,
        description="LoRAF stores: when the shared B has no room for the next task's mask, add this many "
        "rank columns (fresh frozen rows of A) instead of refusing the task with 409. 0: never grow.",
    )

    @field_validator("max_lora_rank")
    @classmethod
    def _rank_is_a_vllm_slot(cls, value: int) -> int:
        if value not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {VLLM_LORA_RANKS}")
        return value

    @model_validator(mode="after")
    def _resolve_model_name(self) -> Self:
        """A catalogue name becomes its directory under <home>/models, so every process that reads
        the settings (server, worker, benchmarks) loads the same files."""
        try:
            self.model = resolve_model(self.model, self.home)
        except ModelNotInstalledError as error:
            raise ValueError(f"LAMINA_MODEL={self.model}: {error}") from None
        return self

    @property
    def store_dir(self) -> Path:
        return self.store or self.home / "store"

    @property
    def events_url(self) -> str | None:
        if self.redis_url:
            return self.redis_url
        if self.broker_url and self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        return None
