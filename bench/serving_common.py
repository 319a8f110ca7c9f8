"""What the serving benchmarks share besides running servers (that is :mod:`server.processes`,
the one way Lamina's processes are started, waited for and stopped): the options every
benchmark that runs servers takes, and filling an adapter store with synthetic adapters so
that no training is needed to benchmark serving.

Synthetic adapters are LoRI-shaped (frozen Kaiming-uniform A, a random B) and published through
:meth:`AdapterStore.publish`, so the server sees exactly what a trained task would give it: real
PEFT safetensors, the real merge (concat, magnitude) and the real ledger events. Their B is small
(``B_STD``), so the adapted model's generations stay close to the base model's and output lengths
stay comparable between configurations; the cost of serving a LoRA does not depend on its values.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the benchmarks run as scripts: python bench/serve/run.py
    sys.path.insert(0, str(REPO))

from adapters_store.events import redis_notifier  # noqa: E402
from adapters_store.fingerprint import fingerprint_model  # noqa: E402
from adapters_store.lora import LoraAdapter, LoraModule  # noqa: E402
from adapters_store.store import AdapterStore, Publication  # noqa: E402
from trainer.config import DEFAULT_TARGET_MODULES  # noqa: E402
from trainer.contract.settings import VLLM_LORA_RANKS, LaminaSettings  # noqa: E402
from trainer.methods.parametrizations import kaiming_uniform, module_seed  # noqa: E402

B_STD = 1e-3  # small: the adapted model answers like the base model, see the module docstring


# --- command line and reports ------------------------------------------------------------


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """``--set FIELD=VALUE`` (a server setting for every Lamina server) and ``--work``, the
    options every benchmark that runs servers takes; :func:`parse_server_arguments` reads them."""
    parser.add_argument(
        "--set", dest="settings", action="append", default=[], metavar="FIELD=VALUE",
        help="server setting for every Lamina server, e.g. --set dtype=bfloat16 --set kv_cache_fraction=0.8",
    )  # fmt: skip
    parser.add_argument(
        "--work", type=Path, default=None, help="keep stores and logs here (default: temporary)"
    )


def parse_server_arguments(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the command line; ``args.settings`` becomes a ``{field: value}`` dict."""
    args = parser.parse_args()
    args.settings = dict(item.split("=", 1) for item in args.settings)
    return args


def lora_slot(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of ``rank``."""
    for slot in VLLM_LORA_RANKS:
        if slot >= rank:
            return slot
    raise ValueError(f"rank {rank} exceeds vLLM's largest LoRA slot {VLLM_LORA_RANKS[-1]}")


# --- synthetic stores ------------------------------------------------------------------------


def base_model_dir() -> Path:
    """The base model the servers will load: ``LAMINA_MODEL`` or the embedded model."""
    return LaminaSettings().model


@dataclass(frozen=True)
class SharedStore:
    """A store kept where hosts share it: the ledger in PostgreSQL at ``database_url`` (migrated),
    the files in the bucket prefix ``url`` on the S3-compatible service at ``endpoint_url``."""

    database_url: str
    url: str
    endpoint_url: str

    def env(self) -> dict[str, str]:
        """The variables a server or worker of this store runs with."""
        return {
            "LAMINA_DATABASE_URL": self.database_url,
            "LAMINA_STORE": self.url,
            "LAMINA_S3_ENDPOINT_URL": self.endpoint_url,
        }

    def store_options(self) -> dict[str, Any]:
        """``AdapterStore`` keyword arguments for this store."""
        from adapters_store.blobs import ObjectStorage
        from adapters_store.ledger_database import DatabaseLedger

        return {
            "ledger": DatabaseLedger(self.database_url, self.url),
            "objects": ObjectStorage(self.url, {"endpoint_url": self.endpoint_url}),
            "location": self.url,
        }


def open_store(
    root: Path, model_dir: Path, redis_url: str | None = None, shared: SharedStore | None = None
) -> AdapterStore:
    """The store at ``root`` for ``model_dir`` (with ``shared``, ``root`` is this process's local
    copy of it); with ``redis_url`` every change is also announced on the store's Redis channel,
    as the trainer does, so servers swap without waiting for a poll."""
    location = shared.url if shared else root
    on_event = redis_notifier(redis_url, location) if redis_url else None
    options = shared.store_options() if shared else {}
    return AdapterStore(
        root, fingerprint_model(model_dir), base_model=str(model_dir), on_event=on_event, **options
    )


def target_shapes(
    model_dir: Path, targets: Sequence[str] = DEFAULT_TARGET_MODULES
) -> dict[str, tuple[int, int]]:
    """``module name -> (d_out, d_in)`` of every linear layer named in ``targets``, read from the
    safetensors headers (no weights loaded, so this is cheap for a 70B model too)."""
    shapes: dict[str, tuple[int, int]] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for key, spec in header.items():
            module, _, leaf = key.rpartition(".")
            if leaf == "weight" and module.rsplit(".", 1)[-1] in targets and len(spec["shape"]) == 2:
                shapes[module] = (int(spec["shape"][0]), int(spec["shape"][1]))
    if not shapes:
        raise ValueError(f"no linear layers named {list(targets)} in {model_dir}")
    return dict(sorted(shapes.items()))


def random_lora(
    shapes: dict[str, tuple[int, int]], rank: int, seed: int, density: float = 1.0, alpha: float = 16.0
) -> LoraAdapter:
    """A LoRI-style adapter: A frozen Kaiming-uniform (seeded as the trainer seeds it), B random
    N(0, B_STD²), masked to ``density`` of its entries when below 1 (LoRI-S)."""
    generator = torch.Generator().manual_seed(seed)
    modules: dict[str, LoraModule] = {}
    masks: dict[str, torch.Tensor] = {}
    for index, (name, (d_out, d_in)) in enumerate(shapes.items()):
        A = kaiming_uniform((rank, d_in), seed=module_seed(seed, index))  # (r, d_in)
        B = B_STD * torch.randn(d_out, rank, generator=generator)  # (d_out, r)
        if density < 1.0:
            masks[name] = torch.rand(d_out, rank, generator=generator) < density
            B = B * masks[name]
        modules[name] = LoraModule(A=A, B=B, scale=alpha / rank)
    return LoraAdapter(modules=modules, masks=masks)


def publish_random(
    store: AdapterStore,
    name: str,
    shapes: dict[str, tuple[int, int]],
    rank: int,
    seed: int,
    method: str,
    merge: str,
) -> Publication:
    """Publish one synthetic task; ``meta`` says it is synthetic so no one mistakes it for a trained one."""
    adapter = random_lora(shapes, rank, seed)
    meta = {"method": method, "synthetic": True, "seed": seed, "hyperparameters": {"r": rank}}
    return store.publish(name, adapter, meta, merge=merge)


def build_concat_store(
    root: Path, model_dir: Path, tasks: int, task_rank: int, prefix: str = "t", seed: int = 0
) -> list[Publication]:
    """A LoRI-D store of ``tasks`` tasks of rank ``task_rank``: ``continual`` is their concat,
    one LoRA of rank tasks · task_rank (LoRI eq. 5–6)."""
    store = open_store(root, model_dir)
    shapes = target_shapes(model_dir)
    return [
        publish_random(store, f"{prefix}{i}", shapes, task_rank, seed + i, "lori-d", "concat")
        for i in range(tasks)
    ]


def build_magnitude_store(
    root: Path, model_dir: Path, tasks: int, task_rank: int, targets: Sequence[str], seed: int = 0
) -> list[Publication]:
    """A PS-LoRA store: ``continual`` is the dense magnitude merge (eq. 5) of the tasks' ΔW."""
    store = open_store(root, model_dir)
    shapes = target_shapes(model_dir, targets)
    return [
        publish_random(store, f"p{i}", shapes, task_rank, seed + i, "ps-lora", "magnitude")
        for i in range(tasks)
    ]
