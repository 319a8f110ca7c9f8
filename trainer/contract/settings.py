"""The settings every Lamina process agrees on (the server's own settings extend them): where the
base model, the store and the broker are. One object, read from ``LAMINA_*`` environment
variables once at start-up and passed explicitly from there on; and how a bad value reads on a
command line. Imports nothing heavy: the API process uses it too.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator
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
    store: str | None = Field(
        None,
        description="Where the adapter store is: a directory (default <home>/store), or an object-storage URL "
        "(s3://bucket/prefix, any S3-compatible service) that every process reads through its own verified "
        "local copy under <home>/copies/<digest of the URL>. A URL needs LAMINA_DATABASE_URL, which then "
        "holds the ledger.",
    )
    database_url: str | None = Field(
        None,
        description="PostgreSQL for the store's ledger, the job board and the writer lock, e.g. "
        "postgresql://lamina@db:5432/lamina, so that servers and workers on several hosts share one store. "
        "The schema is created and upgraded at start-up. None: files in the store's directory.",
    )
    s3_endpoint_url: str | None = Field(
        None,
        description="The S3-compatible service an s3:// store lives on (MinIO, Ceph, ...): its URL, e.g. "
        "http://minio:9000. None: AWS. Credentials come from the usual AWS_* variables.",
    )
    cache: Path | None = Field(
        None,
        description="What Lamina can rebuild and keeps to save time: text sampled from the base (routing "
        "calibration, the general-ability set), corrections and exports, each keyed by what it was made "
        "from. Default: <home>/cache.",
    )
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
    continual_routing: Literal["merge", "task", "off"] = Field(
        "task",
        description="Which model answers a request for `continual`. `task` (default): the model of the learned "
        "task whose prompts the request looks like (what `model=<task>` serves), the base model itself when it "
        "looks like none, so no task is forgotten and what the base knew stays exactly as it was. `merge`: the "
        "live merge instead of the task's model, the base otherwise. `off`: the live merge for every prompt. "
        'A task posted with hyperparameters.applies_to = "all" (a style or persona) sends every prompt to the '
        "merge while it is live.",
    )
    max_forgetting: float = Field(
        2.0,
        ge=0,
        le=100,
        description="Points of accuracy an earlier task may lose when a new task goes live. Before it "
        "publishes, the worker scores `continual` as it will be served on every live task's evaluation set "
        "(held-out examples, or a sample of the training ones); a larger drop ends the job failed with "
        "code would_forget and the live model unchanged (LAMINA_FORGETTING_POLICY).",
    )
    max_general_drop: float = Field(
        3.0,
        ge=0,
        le=100,
        description="Points by which a new task may lower the share of general prompts (sampled from the base, "
        "plus known-answer questions) on which `continual` gives the base's own answer. A task taught to "
        "apply to every prompt is exempt (it is meant to change them): the drop is a warning.",
    )
    forgetting_policy: Literal["refuse", "warn", "off"] = Field(
        "refuse",
        description="What a publish that would forget more than LAMINA_MAX_FORGETTING does: `refuse` (the job "
        "fails, would_forget) or `warn` (it publishes, with the drops in the job's warnings). `off` skips the "
        "check and records no rows (it costs a few % of a job, bench/gate).",
    )
    max_lora_rank: int = Field(
        128,
        description="Largest adapter rank the engine can serve. It bounds how many tasks a concat store "
        "holds (inflora's default rank 8: 16 tasks) and keeps base's and the tasks' corrections exact up to "
        "that rank; every LoRA request costs what one of this rank costs (vLLM pads to it).",
    )
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

    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
        description="Where the worker trains: `auto` (CUDA when torch sees a GPU, else the CPU), `cpu`, "
        "`cuda` or `cuda:<n>`. The server's engine picks its own device (vLLM).",
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="Log lines of the server and the worker: `text` for people, `json` for one JSON object "
        "per line with the request id, job id, model and version where known.",
    )

    _model_name: str = PrivateAttr("")

    @model_validator(mode="after")
    def _object_store_needs_a_database(self) -> Self:
        """Versions in a bucket are made visible by a ledger every host can read and append to:
        a file ledger under one host's copy would be that host's alone."""
        if self.store_is_remote and not self.database_url:
            raise ValueError(
                f"LAMINA_STORE={self.store} is an object-storage URL; set LAMINA_DATABASE_URL too "
                "(the ledger and the job board of a store in object storage live in PostgreSQL)"
            )
        return self

    @field_validator("database_url")
    @classmethod
    def _database_is_postgresql(cls, value: str | None) -> str | None:
        if value is not None and value.partition("://")[0].split("+")[0] not in ("postgresql", "postgres"):
            raise ValueError(
                "database_url must be a PostgreSQL URL: postgresql://user:password@host:5432/database"
            )
        return value

    @field_validator("max_lora_rank")
    @classmethod
    def _rank_is_a_vllm_slot(cls, value: int) -> int:
        if value not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {VLLM_LORA_RANKS}")
        return value

    @model_validator(mode="after")
    def _resolve_model_name(self) -> Self:
        """A catalogue name becomes its directory under <home>/models, so every process that reads
        the settings (server, worker, benchmarks) loads the same files. The name as given is kept
        for :attr:`model_name` (read first: the assignment below marks ``model`` as set)."""
        given = str(self.model) if "model" in self.model_fields_set else None
        try:
            self.model = resolve_model(self.model, self.home)
        except ModelNotInstalledError as error:
            raise ValueError(f"LAMINA_MODEL={self.model}: {error}") from None
        self._model_name = given if given is not None else self.model.name
        return self

    @property
    def model_name(self) -> str:
        """The base model as the user named it: the LAMINA_MODEL value (a catalogue name such as
        ``smollm2-135m-instruct``, or the path as written), or the embedded model's name
        (``lamina-tiny``). What adapters record as ``base_model_name_or_path``, so they say which
        model they belong to on any machine instead of naming a local directory."""
        return self._model_name

    @property
    def store_is_remote(self) -> bool:
        return self.store is not None and "://" in self.store

    @property
    def store_dir(self) -> Path:
        """The store's directory on this host: the store itself, or this host's local copy of a
        store in object storage, one folder per URL (a copy of one bucket's ``m1`` must never be
        taken for another's, nor its numbers skipped by another store)."""
        if self.store is not None and self.store_is_remote:
            return self.home / "copies" / hashlib.sha256(self.store.encode()).hexdigest()[:16]
        return Path(self.store) if self.store is not None else self.home / "store"

    @property
    def store_location(self) -> str:
        """The store's name every process that shares it agrees on (events, locks, database rows):
        the URL as written, or the directory's absolute path."""
        if self.store is not None and self.store_is_remote:
            return self.store
        return str(self.store_dir.expanduser().resolve())

    @property
    def cache_dir(self) -> Path:
        return self.cache or self.home / "cache"

    @property
    def events_url(self) -> str | None:
        if self.redis_url:
            return self.redis_url
        if self.broker_url and self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        return None


def setting_error(error: ValidationError) -> str:
    """The first problem as one line: ``LAMINA_MAX_LORA_RANK: max_lora_rank must be one of ...``.
    Both the ``lamina`` commands and ``lamina-worker`` end with it, so a setting reads the same."""
    first = error.errors()[0]
    message = str(first["msg"]).removeprefix("Value error, ")
    if not first["loc"]:  # a check of the whole object names its variables itself
        return message
    return f"LAMINA_{str(first['loc'][0]).upper()}: {message}"
