"""Every merge against a plain dense reference computation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters_store.lora import LoraAdapter, LoraModule
from adapters_store.merges import (
    MERGES,
    DenseDelta,
    MergeError,
    NonFiniteMerge,
    build_merge,
    magnitude,
)

SHAPES = {"model.layers.0.self_attn.q_proj": (12, 10), "model.layers.0.self_attn.v_proj": (6, 10)}


def make_adapter(
    seed: int,
    rank: int = 3,
    alpha: float = 6.0,
    density: float | None = None,
    A: dict[str, torch.Tensor] | None = None,
    masks: dict[str, torch.Tensor] | None = None,
) -> LoraAdapter:
    """A random adapter over SHAPES; ``density`` draws random masks, ``A``/``masks`` fix them."""
    g = torch.Generator().manual_seed(seed)
    modules, out_masks = {}, {}
    for name, (d_out, d_in) in SHAPES.items():
        a = A[name] if A is not None else torch.randn(rank, d_in, generator=g)
        B = torch.randn(d_out, rank, generator=g)
        mask = None
        if masks is not None:
            mask = masks[name]
        elif density is not None:
            mask = torch.rand(d_out, rank, generator=g) < density
        if mask is not None:
            B = B * mask  # the trainer stores B already masked
            out_masks[name] = mask
        modules[name] = LoraModule(A=a, B=B, scale=alpha / rank)
    return LoraAdapter(modules=modules, masks=out_masks)


def reference_delta(adapter: LoraAdapter, name: str) -> torch.Tensor:
    """ΔW_t = s · (B ⊙ M) @ A in float64, straight from the definition."""
    module = adapter.modules[name]
    B = module.B.double()
    if name in adapter.masks:
        B = B * adapter.masks[name].double()
    return module.scale * B @ module.A.double()


def reference_delta_B(adapter: LoraAdapter, name: str) -> torch.Tensor:
    """B ⊙ M in float64."""
    B = adapter.modules[name].B.double()
    return B * adapter.masks[name].double() if name in adapter.masks else B


def merged_delta(adapter: LoraAdapter, name: str) -> torch.Tensor:
    module = adapter.modules[name]
    return module.scale * module.B.double() @ module.A.double()


@pytest.mark.parametrize("weights", [None, [0.5, 2.0, -1.0]])
def test_concat_is_weighted_sum_of_deltas(weights: list[float] | None) -> None:
    adapters = [
        make_adapter(0, rank=2, alpha=4.0, density=0.6),
        make_adapter(1, rank=3),
        make_adapter(2, rank=4),
    ]
    merged = build_merge("concat", adapters, weights)
    w = weights or [1.0, 1.0, 1.0]
    assert isinstance(merged, LoraAdapter)
    for name in SHAPES:
        expected = sum(wt * reference_delta(a, name) for wt, a in zip(w, adapters, strict=True))
        torch.testing.assert_close(merged_delta(merged, name), expected, rtol=1e-5, atol=1e-5)
        assert merged.modules[name].rank == 2 + 3 + 4
        assert merged.modules[name].scale == 1.0
        assert merged.masks[name].shape == (SHAPES[name][0], 9)


def test_concat_refuses_different_modules() -> None:
    a, b = make_adapter(0), make_adapter(1)
    b.modules.pop("model.layers.0.self_attn.v_proj")
    with pytest.raises(MergeError, match="targets"):
        build_merge("concat", [a, b])


def reference_magnitude(deltas: list[torch.Tensor]) -> torch.Tensor:
    """PS-LoRA eq. 5 entry by entry: the newest ΔW wins whenever |new| >= |kept|."""
    out = deltas[0].clone()
    for delta in deltas[1:]:
        for i in range(out.shape[0]):
            for j in range(out.shape[1]):
                if abs(delta[i, j]) >= abs(out[i, j]):
                    out[i, j] = delta[i, j]
    return out


def test_magnitude_is_elementwise_max_abs() -> None:
    adapters = [make_adapter(s, density=0.5) for s in range(3)]
    merged = build_merge("magnitude", adapters)
    assert isinstance(merged, DenseDelta)
    for name in SHAPES:
        expected = reference_magnitude([reference_delta(a, name).float() for a in adapters])
        torch.testing.assert_close(merged.deltas[name], expected)


def test_magnitude_incremental_equals_full_rebuild() -> None:
    adapters = [make_adapter(s) for s in range(3)]
    step = magnitude(magnitude(None, adapters[0]), adapters[1])
    incremental = build_merge("magnitude", [adapters[2]], previous=step)
    full = build_merge("magnitude", adapters)
    assert isinstance(incremental, DenseDelta) and isinstance(full, DenseDelta)
    for name in SHAPES:
        torch.testing.assert_close(incremental.deltas[name], full.deltas[name], rtol=0, atol=0)


def test_magnitude_ties_go_to_the_new_task() -> None:
    new = make_adapter(0)
    own = magnitude(None, new)  # ΔW_new exactly as the merge computes it
    merged = magnitude(DenseDelta({name: -delta for name, delta in own.deltas.items()}), new)
    for name in SHAPES:
        assert torch.equal(merged.deltas[name], own.deltas[name])  # |new| == |kept| everywhere


def shared_A() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    return {name: torch.randn(4, d_in, generator=g) for name, (_, d_in) in SHAPES.items()}


def disjoint_masks(n: int) -> list[dict[str, torch.Tensor]]:
    """n masks per module that partition B's positions (LoRAF's masks)."""
    g = torch.Generator().manual_seed(7)
    owner = {name: torch.randint(0, n, (d_out, 4), generator=g) for name, (d_out, _) in SHAPES.items()}
    return [{name: owner[name] == t for name in SHAPES} for t in range(n)]


def test_sum_with_shared_A_and_disjoint_masks_is_sum_of_deltas() -> None:
    A = shared_A()
    adapters = [make_adapter(s, rank=4, A=A, masks=m) for s, m in enumerate(disjoint_masks(3))]
    merged = build_merge("sum", adapters, [1.0, 0.5, 2.0])
    assert isinstance(merged, LoraAdapter)
    for name in SHAPES:
        expected = sum(w * reference_delta(a, name) for w, a in zip([1.0, 0.5, 2.0], adapters, strict=True))
        torch.testing.assert_close(merged_delta(merged, name), expected, rtol=1e-5, atol=1e-5)
        assert merged.modules[name].rank == 4
        assert bool(merged.masks[name].all())  # the three masks cover every position


def test_sum_refuses_overlapping_masks() -> None:
    A = shared_A()
    masks = disjoint_masks(2)
    q = "model.layers.0.self_attn.q_proj"
    overlapping = {name: m.clone() for name, m in masks[1].items()}
    i, j = masks[0][q].nonzero()[0].tolist()
    overlapping[q][i, j] = True  # one position owned by both tasks
    adapters = [make_adapter(0, rank=4, A=A, masks=masks[0]), make_adapter(1, rank=4, A=A, masks=overlapping)]
    with pytest.raises(MergeError, match="disjoint"):
        build_merge("sum", adapters)


def test_sum_refuses_different_A() -> None:
    masks = disjoint_masks(2)
    adapters = [make_adapter(0, rank=4, masks=masks[0]), make_adapter(1, rank=4, masks=masks[1])]
    with pytest.raises(MergeError, match="shared A"):
        build_merge("sum", adapters)


def test_linear_is_product_of_weighted_sums_with_cross_terms() -> None:
    adapters = [make_adapter(0, density=0.7), make_adapter(1, alpha=3.0)]
    w = [0.6, 0.4]
    merged = build_merge("linear", adapters, w)
    assert isinstance(merged, LoraAdapter)
    for name in SHAPES:
        m = [a.modules[name] for a in adapters]
        B_sum = torch.stack(
            [wt * mod.scale * reference_delta_B(a, name) for wt, mod, a in zip(w, m, adapters, strict=True)]
        ).sum(0)
        A_sum = torch.stack([wt * mod.A.double() for wt, mod in zip(w, m, strict=True)]).sum(0)
        torch.testing.assert_close(merged_delta(merged, name), B_sum @ A_sum, rtol=1e-5, atol=1e-5)
        no_cross = torch.stack(
            [wt * wt * reference_delta(a, name) for wt, a in zip(w, adapters, strict=True)]
        ).sum(0)
        assert not torch.allclose(merged_delta(merged, name), no_cross)  # the cross terms are there


def test_linear_refuses_different_ranks() -> None:
    with pytest.raises(MergeError, match="equal ranks"):
        build_merge("linear", [make_adapter(0, rank=2), make_adapter(1, rank=3)])


def test_latest_serves_the_newest_adapter() -> None:
    adapters = [make_adapter(0), make_adapter(1)]
    merged = build_merge("latest", adapters)
    assert isinstance(merged, LoraAdapter)
    for name in SHAPES:
        torch.testing.assert_close(merged_delta(merged, name), reference_delta(adapters[1], name))


def test_svd_export_reports_its_relative_error() -> None:
    dense = build_merge("magnitude", [make_adapter(s) for s in range(3)])
    assert isinstance(dense, DenseDelta)
    total = sum(float(d.double().pow(2).sum()) for d in dense.deltas.values()) ** 0.5
    for rank in (1, 3, 20):
        lora, error = dense.to_lora_svd(rank)
        residual = (
            sum(float((dense.deltas[n].double() - merged_delta(lora, n)).pow(2).sum()) for n in dense.deltas)
            ** 0.5
        )
        assert error == pytest.approx(residual / total, rel=1e-4, abs=1e-6)
        assert {m.rank for m in lora.modules.values()} == {rank}  # padded to one rank for PEFT
    assert dense.to_lora_svd(1)[1] > dense.to_lora_svd(3)[1] > 0.0
    assert dense.to_lora_svd(20)[1] == pytest.approx(0.0, abs=1e-6)  # 20 >= every module's rank


def test_peft_round_trip_preserves_tensors(tmp_path: Path) -> None:
    merged = build_merge("concat", [make_adapter(0, density=0.5), make_adapter(1, density=0.5)])
    assert isinstance(merged, LoraAdapter)
    merged.save_peft(tmp_path, base_model="tiny")
    loaded = LoraAdapter.load_peft(tmp_path)
    assert loaded.modules.keys() == merged.modules.keys()
    for name, module in merged.modules.items():
        assert torch.equal(loaded.modules[name].A, module.A)
        assert torch.equal(loaded.modules[name].B, module.B)
        assert loaded.modules[name].scale == pytest.approx(module.scale)
        assert torch.equal(loaded.masks[name], merged.masks[name])


def test_dense_delta_round_trip(tmp_path: Path) -> None:
    dense = build_merge("magnitude", [make_adapter(0), make_adapter(1)])
    assert isinstance(dense, DenseDelta)
    dense.save(tmp_path)
    loaded = DenseDelta.load(tmp_path)
    for name, delta in dense.deltas.items():
        assert torch.equal(loaded.deltas[name], delta)


def test_non_finite_merge_is_refused() -> None:
    bad = make_adapter(1)
    name = "model.layers.0.self_attn.q_proj"
    B = bad.modules[name].B.clone()
    B[0, 0] = float("nan")
    bad.modules[name] = LoraModule(A=bad.modules[name].A, B=B, scale=bad.modules[name].scale)
    for kind in ("concat", "magnitude"):
        with pytest.raises(NonFiniteMerge, match=f"adapter 1 has NaN/Inf in module {name}"):
            build_merge(kind, [make_adapter(0), bad])


def test_overflowing_merge_is_refused() -> None:
    """Finite inputs whose fp32 result overflows: the check on the output catches it."""
    huge = make_adapter(0)
    huge.modules.update(
        {n: LoraModule(A=m.A * 1e20, B=m.B * 1e20, scale=m.scale) for n, m in huge.modules.items()}
    )
    with pytest.raises(NonFiniteMerge, match="merge has NaN/Inf"):
        build_merge("magnitude", [huge])
    with pytest.raises(NonFiniteMerge, match="merge has NaN/Inf"):
        build_merge("concat", [make_adapter(0)], [1e39])


def test_build_merge_checks_its_arguments() -> None:
    adapters = [make_adapter(0), make_adapter(1)]
    with pytest.raises(MergeError, match="unknown merge"):
        build_merge("ties", adapters)
    with pytest.raises(MergeError, match="2 adapters"):
        build_merge("concat", adapters, [1.0])
    with pytest.raises(MergeError, match="takes no weights"):
        build_merge("magnitude", adapters, [1.0, 1.0])
    with pytest.raises(MergeError, match="not incremental"):
        build_merge("concat", adapters, previous=DenseDelta({}))
    with pytest.raises(MergeError, match="nothing"):
        build_merge("concat", [])
    assert set(MERGES) >= {"concat", "sum", "linear", "magnitude", "latest"}


def test_peft_itself_serves_the_concat_merge(tmp_path: Path) -> None:
    """PEFT's own loader on our layout gives W0 + Σ w_t ΔW_t (checks the scale-1 / alpha = r fold)."""
    peft = pytest.importorskip("peft")
    from torch import nn

    class Base(nn.Module):
        def prepare_inputs_for_generation(self, *args: object, **kwargs: object) -> dict:
            return {}  # PeftModelForCausalLM reads it at construction

    base = Base()
    W0 = {}
    for name, (d_out, d_in) in SHAPES.items():
        parent, _, leaf = name.rpartition(".")
        _add_path(base, parent)
        linear = nn.Linear(d_in, d_out, bias=False)
        base.get_submodule(parent).add_module(leaf, linear)
        W0[name] = linear.weight.detach().clone()

    merged = build_merge(
        "concat", [make_adapter(0, rank=2, density=0.5), make_adapter(1, rank=3)], [0.5, 1.0]
    )
    assert isinstance(merged, LoraAdapter)
    merged.save_peft(tmp_path, base_model="tiny")
    model = peft.PeftModel.from_pretrained(base, str(tmp_path))
    x = torch.randn(5, 10)
    for name in SHAPES:
        out = model.get_submodule(f"base_model.model.{name}")(x)
        torch.testing.assert_close(out, x @ (W0[name] + merged.modules[name].delta()).T, rtol=1e-4, atol=1e-4)


def _add_path(root: torch.nn.Module, path: str) -> None:
    """Create empty modules along a dotted path (``model.layers.0.self_attn``)."""
    node = root
    for part in path.split("."):
        if not hasattr(node, part):
            node.add_module(part, torch.nn.Module())
        node = getattr(node, part)
