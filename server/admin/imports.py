"""Importing a LoRA trained elsewhere (PEFT's ``save_pretrained`` output) as a task.

The adapter arrives as the two files PEFT writes, uploaded (never a path on the server, so an
admin key cannot make the server read its own files). It is checked against the base model
before anything is written: a LoRA (no DoRA, no per-module ranks, no extra trained modules), a
rank the engine can serve, and every module one of the base's linear layers with A and B of
that layer's shape. Only then does it go through :meth:`AdapterStore.publish`, the path a
trained task takes, so it becomes a version, joins the continual merge and is hot-swapped in.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors

from adapters_store.lora import LoraAdapter, LoraModule
from server.errors import APIError

_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight")
# Options of PEFT's LoraConfig that change what the weights mean; refused unless at their default.
_UNSUPPORTED = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layer_replication": None,
    "lora_bias": False,
}


UNSWAPPABLE = {"lm_head"}  # linear in the base's files, but vLLM cannot apply a LoRA to it here


def refuse(message: str, param: str, code: str = "invalid_adapter", status: int = 422) -> APIError:
    return APIError(status, message, param=param, code=code)


def base_linear_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """``module path -> (out_features, in_features)`` of every 2-D ``<module>.weight`` in the base
    model's safetensors files but the embedding tables, read from their headers (no tensor is
    loaded)."""
    shapes: dict[str, tuple[int, int]] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                if key.endswith(".weight"):
                    shape = handle.get_slice(key).get_shape()
                    if len(shape) == 2 and "embed" not in key.rsplit(".", 2)[-2]:  # no embedding tables
                        shapes[key.removesuffix(".weight")] = (int(shape[0]), int(shape[1]))
    return shapes


def parse_peft_lora(
    config_bytes: bytes, weights_bytes: bytes, base_shapes: dict[str, tuple[int, int]], max_lora_rank: int
) -> tuple[LoraAdapter, dict[str, Any]]:
    """The adapter in PEFT's files, checked against the base; returns it and its config.

    Raises :class:`APIError` (422) naming the first thing that is wrong.
    """
    try:
        config = json.loads(config_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise refuse(f"adapter_config.json is not JSON: {error}", "config") from None
    if not isinstance(config, dict):
        raise refuse("adapter_config.json must be a JSON object", "config")
    if config.get("peft_type") != "LORA":
        raise refuse(f"peft_type must be LORA, got {config.get('peft_type')!r}", "config.peft_type")
    for option, default in _UNSUPPORTED.items():
        value = config.get(option, default)
        if value != default and not (default is None and not value):
            raise refuse(f"{option}={value!r} is not supported (only {default!r})", f"config.{option}")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise refuse(f"r must be a positive integer, got {rank!r}", "config.r")
    if rank > max_lora_rank:
        raise refuse(
            f"r={rank} is above the server's max_lora_rank {max_lora_rank}", "config.r", code="rank_too_large"
        )
    if (
        not isinstance(alpha, int | float)
        or isinstance(alpha, bool)
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise refuse(f"lora_alpha must be a positive number, got {alpha!r}", "config.lora_alpha")
    scale = float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)

    try:
        tensors = load_safetensors(weights_bytes)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise refuse(f"adapter_model.safetensors is not a safetensors file: {error}", "weights") from None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise refuse(
                f"tensor {key!r} is not a LoRA factor (base_model.model.<module>.lora_A|B.weight)", "weights"
            )
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    if not parts:
        raise refuse("adapter_model.safetensors holds no LoRA factors", "weights")

    modules: dict[str, LoraModule] = {}
    for name, pair in sorted(parts.items()):
        if set(pair) != {"A", "B"}:
            raise refuse(f"module {name} has lora_{''.join(pair)} but not both lora_A and lora_B", "weights")
        if name.rsplit(".", 1)[-1] in UNSWAPPABLE:
            raise refuse(
                f"module {name} is the output layer: vLLM serves LoRA on the transformer's linear layers "
                "only, so no server could load this adapter",
                "weights",
                code="unsupported_module",
            )
        if name not in base_shapes:
            raise refuse(
                f"module {name} is not a linear layer of the base model", "weights", code="unknown_module"
            )
        out_features, in_features = base_shapes[name]
        A, B = pair["A"], pair["B"]
        if tuple(A.shape) != (rank, in_features) or tuple(B.shape) != (out_features, rank):
            raise refuse(
                f"module {name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not fit r={rank} and "
                f"the base layer (in_features={in_features}, out_features={out_features}); expected "
                f"lora_A {(rank, in_features)} and lora_B {(out_features, rank)}",
                "weights",
                code="shape_mismatch",
            )
        if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())):
            raise refuse(f"module {name} holds NaN or Inf", "weights")
        modules[name] = LoraModule(A=A.float(), B=B.float(), scale=scale)
    return LoraAdapter(modules=modules), config
