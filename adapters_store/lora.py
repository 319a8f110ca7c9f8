"""In-memory LoRA adapters and their PEFT on-disk layout.

Every part of Lamina talks about adapters through these two types, so that the trainer, the
merges and the stats never depend on PEFT's model classes. The on-disk layout is PEFT's own
(``adapter_config.json`` + ``adapter_model.safetensors``), which vLLM, PEFT and LoRAX load.

Notation (PEFT's): for a target linear W0 of shape (d_out, d_in) an adapter adds
ΔW = scale · B @ A with A (r, d_in), B (d_out, r) and scale = lora_alpha / r.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MASKS_FILE = "masks.safetensors"
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraModule:
    """One target module's low-rank update ΔW = scale · B @ A (B already masked)."""

    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self, rows: slice | None = None) -> torch.Tensor:
        """ΔW in fp32, optionally only a block of rows (stats and merges stream row chunks)."""
        B = self.B.float() if rows is None else self.B[rows].float()
        return self.scale * (B @ self.A.float())  # (d_out or len(rows), d_in)


@dataclass
class LoraAdapter:
    """A set of per-module LoRA updates, keyed by the module's path in the base model,
    e.g. ``model.layers.0.self_attn.q_proj``."""

    modules: dict[str, LoraModule]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # bool (d_out, r) per module

    @property
    def rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def target_modules(self) -> list[str]:
        """Short names (``q_proj``, ``v_proj``) as PEFT's ``target_modules`` expects."""
        return sorted({name.rsplit(".", 1)[-1] for name in self.modules})

    def deltas(self) -> dict[str, torch.Tensor]:
        return {name: module.delta() for name, module in self.modules.items()}

    def save_peft(self, directory: Path, base_model: str) -> None:
        """Write PEFT's layout into ``directory`` (which must exist).

        All modules must share one rank and scale, as PEFT's single ``r``/``lora_alpha``
        requires; merges that produce a single adapter fold their weights into B and use
        scale 1 (alpha = r) to satisfy this.
        """
        ranks = {m.rank for m in self.modules.values()}
        scales = {round(m.scale, 12) for m in self.modules.values()}
        if len(ranks) != 1 or len(scales) != 1:
            raise ValueError(f"PEFT layout needs one rank and scale, got ranks={ranks} scales={scales}")
        rank, scale = ranks.pop(), scales.pop()
        tensors: dict[str, torch.Tensor] = {}
        for name, module in self.modules.items():
            tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = module.A.float().contiguous()
            tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = module.B.float().contiguous()
        save_file(tensors, str(directory / ADAPTER_WEIGHTS))
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": rank,
            "lora_alpha": scale * rank,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "target_modules": self.target_modules,
            "inference_mode": True,
        }
        (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        if self.masks:
            save_file(
                {k: v.to(torch.uint8).contiguous() for k, v in self.masks.items()},
                str(directory / MASKS_FILE),
            )

    @classmethod
    def load_peft(cls, directory: Path) -> LoraAdapter:
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
        scale = float(config["lora_alpha"]) / float(config["r"])
        tensors = load_file(str(directory / ADAPTER_WEIGHTS))
        modules: dict[str, LoraModule] = {}
        for key, A in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            name = key.removeprefix(_PEFT_PREFIX).removesuffix(".lora_A.weight")
            B = tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"]
            modules[name] = LoraModule(A=A, B=B, scale=scale)
        masks: dict[str, torch.Tensor] = {}
        if (directory / MASKS_FILE).exists():
            masks = {k: v.bool() for k, v in load_file(str(directory / MASKS_FILE)).items()}
        return cls(modules=modules, masks=masks)
