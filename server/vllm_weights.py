"""Runs inside vLLM's worker process: writes W0 + ΔW into the model's linear layers.

vLLM runs the model in a worker process and mixes :class:`DenseWeightsExtension` into its worker
class when the engine is built with ``worker_extension_cls=WORKER_EXTENSION``
(server/engine.py). The server calls these methods by name through ``collective_rpc``
(:meth:`server.engine.Engine.apply_dense_delta`) with two file paths; nothing is pickled and no
tensor crosses the process boundary (tensors sent as RPC arguments arrive as plain lists). The
worker imports this module by its dotted path, so it imports nothing from the server and nothing
heavy at module level: torch, safetensors, vLLM and the store's LoRA reader load inside the
methods, in the worker.

Any merge can be served this way: a dense one (PS-LoRA's magnitude merge, a
:class:`~adapters_store.merges.DenseDelta`, which is not low-rank and cannot be an exact LoRA)
and a LoRA one (concat, sum: exact sums W0 + Σ wₜΔWₜ, whose rank grows with every task and
whose per-token LoRA cost grows with it). The continual model then costs what the base model
costs per token; server/swap/corrections.py serves the other models relative to these weights.

How W0 is kept for rollback: it is not kept at all. W0 is the base model's own safetensors
files, which Lamina never writes, so the worker re-reads the slices it needs from disk each
time. The worker only remembers *which* modules it has changed, so a later apply (or the
rollback, ``delta_path=None``) can put every one of them back to W0 exactly, bit for bit.

Facts about vLLM 0.32 this relies on (each checked by tests/unit/server/test_vllm_weights.py or an integration test):

- LoRA wraps every targeted linear layer (``qkv_proj.base_layer`` holds the real layer) and
  the model fuses projections: ``qkv_proj`` rows are [q; k; v], ``gate_up_proj`` rows are
  [gate; up] (the model's ``packed_modules_mapping`` says which).
- CPU backend: after loading, a linear layer runs from a packed copy made by
  ``process_weights_after_loading`` and ``layer.weight`` is empty, so the only way to change it
  is to set a new ``weight`` and run that step again.
- GPU backends: ``layer.weight`` is what the kernels read, so the layer's own
  ``weight_loader`` copies into it in place (the same loader ``model.load_weights`` uses, which
  also shards for tensor parallelism and keeps CUDA-graph pointers valid). ``model.load_weights``
  itself cannot be used once LoRA has wrapped the layers: it looks parameters up by their
  unwrapped names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the worker imports torch itself; this module must stay light to import
    import torch

WORKER_EXTENSION = "server.vllm_weights.DenseWeightsExtension"
"""Pass as ``AsyncEngineArgs(worker_extension_cls=...)`` so the worker has the methods below."""

APPLY_METHOD = "lamina_apply_dense_delta"
"""``(base_model_dir, delta_path | None) -> vLLM modules written``, called through ``collective_rpc``."""
PROBE_METHOD = "lamina_probe_linear"
"""``(vLLM module name, probe vector) -> W @ probe``, called through ``collective_rpc``."""
_TOUCHED_ATTR = "_lamina_dense_modules"  # set on the worker instance, not the class

Shard = tuple[str, str | int | None]  # (HF module name, vLLM shard id; None when not fused)


class DenseWeightsExtension:
    """Methods vLLM adds to its worker class; they run in the worker process, as ``self``.

    vLLM refuses an extension whose attribute names clash with the worker's, hence the prefix.
    """

    def lamina_apply_dense_delta(self, base_model_dir: str, delta_path: str | None) -> list[str]:
        """Write W0 + ΔW (or W0) into every targeted linear layer; return the vLLM modules written."""
        import torch

        model = self.get_model()  # type: ignore[attr-defined]
        deltas = _Deltas.open(delta_path)
        plan = _plan(model, deltas)
        checkpoint = _Checkpoint(Path(base_model_dir))
        _validate(model, plan, deltas, checkpoint)

        touched: set[str] = getattr(self, _TOUCHED_ATTR, set())
        targets = sorted(touched | set(plan))
        # Until this call succeeds any of them may hold something other than W0.
        setattr(self, _TOUCHED_ATTR, set(targets))
        for name in targets:
            shards = plan.get(name) or _shards(model, name)
            weights = []
            for hf_name, _ in shards:
                w0 = checkpoint.get(hf_name + ".weight")
                delta = deltas.get(hf_name)
                weights.append(w0 if delta is None else w0.float() + delta.float())
            with torch.no_grad():
                _write(_base_layer(model, name), shards, weights)
        setattr(self, _TOUCHED_ATTR, set(plan))
        return targets

    def lamina_probe_linear(self, module: str, probe: list[float]) -> list[float]:
        """``W @ probe`` through the layer's own forward path (see :meth:`server.engine.Engine.probe_linear`)."""
        import torch

        layer = _base_layer(self.get_model(), module)  # type: ignore[attr-defined]
        x = torch.tensor([probe], dtype=layer.weight.dtype, device=layer.weight.device)
        with torch.inference_mode():
            y = layer.quant_method.apply(layer, x)
        return [float(v) for v in y[0].float().cpu()]


def _plan(model: Any, deltas: _Deltas) -> dict[str, list[Shard]]:
    """Group the delta's HF module names by the vLLM module that holds them.

    Returns vLLM module name -> all of its shards in row order, so a fused layer is always
    rebuilt whole (its other shards from W0)."""
    plan: dict[str, list[Shard]] = {}
    fused_of = {
        part: fused for fused, parts in getattr(model, "packed_modules_mapping", {}).items() for part in parts
    }
    for hf_name in deltas:
        prefix, _, leaf = hf_name.rpartition(".")
        vllm_name = f"{prefix}.{fused_of[leaf]}" if leaf in fused_of else hf_name
        if vllm_name not in plan:
            plan[vllm_name] = _shards(model, vllm_name)
    return plan


def _shards(model: Any, vllm_name: str) -> list[Shard]:
    """The HF modules inside one vLLM module, with the shard id its weight loader expects."""
    from vllm.model_executor.layers.linear import QKVParallelLinear

    prefix, _, leaf = vllm_name.rpartition(".")
    parts = getattr(model, "packed_modules_mapping", {}).get(leaf)
    if not parts:
        return [(vllm_name, None)]
    qkv = isinstance(_base_layer(model, vllm_name), QKVParallelLinear)
    return [(f"{prefix}.{part}", "qkv"[i] if qkv else i) for i, part in enumerate(parts)]


def _base_layer(model: Any, vllm_name: str) -> Any:
    """The real linear layer under ``vllm_name`` (LoRA keeps it as ``base_layer``)."""
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

    try:
        module = model.get_submodule(vllm_name)
    except AttributeError:
        raise ValueError(f"the engine's model has no module {vllm_name!r}") from None
    layer = getattr(module, "base_layer", module)
    if not isinstance(layer, LinearBase) or not isinstance(layer.quant_method, UnquantizedLinearMethod):
        raise ValueError(f"{vllm_name} is not an unquantized linear layer; dense deltas cannot target it")
    return layer


class _Deltas:
    """ΔW per HF module name, from a dense ``delta.safetensors`` or from a LoRA merge in PEFT
    layout (a directory), where ΔW = scale · B @ A is formed one module at a time when written,
    so a whole model's ΔW never lives in memory at once (and never goes through a file)."""

    def __init__(self, dense: dict[str, torch.Tensor], factors: dict[str, Any]) -> None:
        self._dense, self._factors = dense, factors

    @classmethod
    def open(cls, path: str | None) -> _Deltas:
        if path is None:
            return cls({}, {})
        if Path(path).is_dir():
            from adapters_store.lora import LoraAdapter

            return cls({}, LoraAdapter.load_peft(Path(path)).modules)
        from safetensors.torch import load_file

        return cls(load_file(path), {})

    def __iter__(self) -> Any:
        return iter([*self._dense, *self._factors])

    def __contains__(self, name: str) -> bool:
        return name in self._dense or name in self._factors

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._dense:
            return tuple(self._dense[name].shape)
        module = self._factors[name]
        return (int(module.B.shape[0]), int(module.A.shape[1]))

    def finite(self, name: str) -> bool:
        import torch

        if name in self._dense:
            return bool(torch.isfinite(self._dense[name]).all())
        module = self._factors[name]
        return bool(torch.isfinite(module.A).all() and torch.isfinite(module.B).all())

    def get(self, name: str) -> torch.Tensor | None:
        """ΔW in fp32, or None when this delta does not touch ``name``."""
        if name in self._dense:
            return self._dense[name].float()
        if name in self._factors:
            return self._factors[name].delta()  # (d_out, d_in), fp32
        return None


class _Checkpoint:
    """Reads single tensors from the base model's safetensors files (headers only until asked)."""

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        self._open = safe_open
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {key: directory / file for key, file in weight_map.items()}
        else:
            self.files = {}
            for file in sorted(directory.glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as handle:
                    self.files.update(dict.fromkeys(handle.keys(), file))
        if not self.files:
            raise FileNotFoundError(f"no safetensors weights in {directory}")

    def _file(self, key: str) -> Path:
        if key not in self.files:
            raise KeyError(f"{key} is not in the base model's checkpoint")
        return self.files[key]

    def shape(self, key: str) -> tuple[int, ...]:
        with self._open(str(self._file(key)), framework="pt") as handle:
            return tuple(handle.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        with self._open(str(self._file(key)), framework="pt") as handle:
            return handle.get_tensor(key)


def _validate(model: Any, plan: dict[str, list[Shard]], deltas: _Deltas, checkpoint: _Checkpoint) -> None:
    """Fail before writing anything: every delta names a shard of the model and matches W0's shape."""
    covered = {hf for shards in plan.values() for hf, _ in shards}
    for hf_name in deltas:
        if hf_name not in covered:
            raise ValueError(f"delta module {hf_name} is not a linear layer of the engine's model")
        expected = checkpoint.shape(hf_name + ".weight")
        if deltas.shape(hf_name) != expected:
            raise ValueError(f"delta {hf_name} has shape {deltas.shape(hf_name)}, the base weight {expected}")
        if not deltas.finite(hf_name):
            raise ValueError(f"delta {hf_name} holds NaN or Inf")
    for name, shards in plan.items():
        _base_layer(model, name)
        for hf_name, _ in shards:
            checkpoint.shape(hf_name + ".weight")


def _write(layer: Any, shards: list[Shard], weights: list[torch.Tensor]) -> None:
    """Put full-size HF weights (one per shard, row order) into a vLLM linear layer."""
    import torch
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        # The layer runs from a packed copy; rebuild the fused weight whole and let vLLM's own
        # post-load step repack it (and drop ``weight`` again), exactly as at engine start.
        from vllm.distributed import get_tensor_model_parallel_world_size

        if get_tensor_model_parallel_world_size() != 1:
            raise NotImplementedError("dense weights on the CPU backend need tensor_parallel_size=1")
        dtype = layer.weight.dtype
        fused = torch.cat([w.to(dtype) for w in weights], dim=0).contiguous()
        expected = (sum(layer.output_partition_sizes), layer.input_size_per_partition)
        if tuple(fused.shape) != expected:
            raise ValueError(f"fused weight {tuple(fused.shape)} does not fit the layer's {expected}")
        layer.weight = torch.nn.Parameter(fused, requires_grad=False)
        layer.quant_method.process_weights_after_loading(layer)
        return

    # GPU: copy in place through the layer's loader, which narrows to this rank's shard and
    # casts to the layer's dtype (one rounding of the fp32 sum).
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    param = layer.weight
    loader = getattr(param, "weight_loader", default_weight_loader)
    for (_, shard_id), weight in zip(shards, weights, strict=True):
        if shard_id is None:
            loader(param, weight)
        else:
            loader(param, weight, shard_id)  # type: ignore[call-arg]  # fused layers' loaders take a shard id
