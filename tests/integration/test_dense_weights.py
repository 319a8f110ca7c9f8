"""Merges served from the running engine's weights: W0 + ΔW goes in, W0 comes back exactly; with a
concat merge in the weights, base and the tasks are served as corrections and answer as before.

One real vLLM engine (CPU) for the whole module. The reference for W0 + ΔW is ``transformers``
in float32 with ΔW added to its ``nn.Linear`` weights, so the fused qkv / gate_up slicing on the
vLLM side is checked against a model that has no fusion at all.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters_store.fingerprint import fingerprint_model
from adapters_store.lora import LoraAdapter, LoraModule
from adapters_store.merges import DenseDelta
from adapters_store.store import AdapterStore
from server.engine import Engine
from server.settings import ServerSettings
from server.swap.registry import ModelNotFound, ModelRegistry
from server.swap.sync import AdapterSync

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

PROMPTS = [[1, 17, 42, 99, 5], [1, 250, 3 + 7, 64], [1, 88, 120, 121, 122, 9, 30]]
NEW_TOKENS = 8
FULL_DELTA_LAYER = 1
ALL_PROJECTIONS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


@dataclass
class Live:
    engine: Engine
    runner: asyncio.Runner  # AsyncLLM binds its output task to one loop: every call uses this one
    model_dir: Path
    w0: dict[str, torch.Tensor]
    base_tokens: list[list[int]]

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.runner.run(coro)

    def greedy(self) -> list[list[int]]:
        return self.run(_engine_greedy(self.engine))

    def apply(self, delta_path: Path | None) -> float:
        started = time.perf_counter()
        self.run(self.engine.apply_dense_delta(self.model_dir, delta_path))
        return time.perf_counter() - started

    def probe(self, module: str, vector: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.run(self.engine.probe_linear(module, vector.tolist())))


async def _engine_greedy(engine: Engine) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    tokens = []
    for ids in PROMPTS:  # one at a time: the same batch shape every time, so outputs compare exactly
        final = None
        prompt = TokensPrompt(prompt_token_ids=ids)
        async for output in engine.generate(prompt, params, uuid.uuid4().hex, None):
            final = output
        assert final is not None
        tokens.append(list(final.outputs[0].token_ids))
    return tokens


def _transformers_greedy(model_dir: Path, delta: DenseDelta) -> list[list[int]]:
    """Greedy tokens of the unfused HF model with ΔW added (argmax loop, no EOS handling)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, d in delta.deltas.items():
            model.get_submodule(name).weight += d
        tokens = []
        for ids in PROMPTS:
            seq = torch.tensor([ids])
            for _ in range(NEW_TOKENS):
                next_id = model(seq).logits[0, -1].argmax()
                seq = torch.cat([seq, next_id.view(1, 1)], dim=1)
            tokens.append(seq[0, len(ids) :].tolist())
    return tokens


def _delta(w0: dict[str, torch.Tensor], modules: list[str], seed: int) -> DenseDelta:
    """Seeded random ΔW about as large as the weights themselves, so greedy outputs move."""
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for name in modules:
        weight = w0[name + ".weight"]
        deltas[name] = torch.randn(weight.shape, generator=generator) * weight.float().std()
    return DenseDelta(deltas)


@pytest.fixture(scope="module")
def live(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    model_dir = base_model_dir  # the embedded model the server serves by default
    w0 = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        w0.update(load_file(str(file)))
    engine = Engine(ServerSettings(model=model_dir, home=tmp_path_factory.mktemp("home")))
    runner = asyncio.Runner()
    engine.start()
    try:
        base = runner.run(_engine_greedy(engine))
        yield Live(engine, runner, model_dir, w0, base)
    finally:
        engine.shutdown()
        runner.close()


def test_delta_matches_transformers_and_rollback_restores_base(live: Live, tmp_path: Path) -> None:
    modules = [f"model.layers.{FULL_DELTA_LAYER}.{p}" for p in ALL_PROJECTIONS]
    modules += ["model.layers.3.self_attn.q_proj", "model.layers.3.mlp.down_proj"]
    delta = _delta(live.w0, modules, seed=0)

    seconds = live.apply(delta.save(tmp_path))
    merged = live.greedy()
    print(f"apply_dense_delta: {seconds:.3f} s for {len(modules)} modules")

    assert merged == _transformers_greedy(live.model_dir, delta)
    assert merged != live.base_tokens

    live.apply(None)
    assert live.greedy() == live.base_tokens


def test_q_only_delta_changes_only_the_q_rows_and_undoes_earlier_modules(live: Live, tmp_path: Path) -> None:
    layer = f"model.layers.{FULL_DELTA_LAYER}"
    qkv, o_proj = f"{layer}.self_attn.qkv_proj", f"{layer}.self_attn.o_proj"
    q_w0 = live.w0[f"{layer}.self_attn.q_proj.weight"]
    q_rows = q_w0.shape[0]
    vector = torch.randn(q_w0.shape[1], generator=torch.Generator().manual_seed(1))
    base_qkv, base_o = live.probe(qkv, vector), live.probe(o_proj, vector)

    full_dir, q_dir = tmp_path / "full", tmp_path / "q"
    full_dir.mkdir()
    q_dir.mkdir()
    live.apply(_delta(live.w0, [f"{layer}.{p}" for p in ALL_PROJECTIONS], seed=2).save(full_dir))
    assert not torch.equal(live.probe(o_proj, vector), base_o)

    q_delta = _delta(live.w0, [f"{layer}.self_attn.q_proj"], seed=3)
    live.apply(q_delta.save(q_dir))
    got = live.probe(qkv, vector)
    expected_q = (q_w0.float() + q_delta.deltas[f"{layer}.self_attn.q_proj"]) @ vector
    torch.testing.assert_close(got[:q_rows], expected_q, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[:q_rows], base_qkv[:q_rows])
    assert torch.equal(got[q_rows:], base_qkv[q_rows:]), "k and v must be W0 again, bit for bit"
    assert torch.equal(live.probe(o_proj, vector), base_o), "o_proj was only in the earlier delta"

    live.apply(None)
    assert torch.equal(live.probe(qkv, vector), base_qkv)
    assert live.greedy() == live.base_tokens


def test_a_bad_delta_is_refused_before_any_weight_changes(live: Live, tmp_path: Path) -> None:
    good = _delta(live.w0, ["model.layers.0.mlp.down_proj"], seed=4).deltas
    bad = DenseDelta({**good, "model.layers.0.self_attn.q_proj": torch.zeros(2, 2)})
    with pytest.raises(Exception, match="shape"):
        live.apply(bad.save(tmp_path))
    assert live.greedy() == live.base_tokens


# --- the live merge of every kind in the weights, the other models as corrections -------------


def _concat_task(w0: dict[str, torch.Tensor], seed: int, rank: int = 8) -> LoraAdapter:
    """A task on every projection whose ΔW is about as large as the weights (greedy outputs move)."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for key, weight in sorted(w0.items()):
        name = key.removesuffix(".weight")
        if weight.ndim != 2 or name.rsplit(".", 1)[-1] not in {p.rsplit(".", 1)[-1] for p in ALL_PROJECTIONS}:
            continue
        d_out, d_in = weight.shape
        A = torch.randn(rank, d_in, generator=generator) / d_in**0.5  # (r, d_in)
        B = torch.randn(d_out, rank, generator=generator) * weight.float().std() * (d_in / rank) ** 0.5
        modules[name] = LoraModule(A=A, B=B, scale=1.0)
    return LoraAdapter(modules=modules)


async def _route_greedy(engine: Engine, registry: ModelRegistry, model: str) -> list[list[int]]:
    """Greedy tokens of ``model`` as the server resolves it (its route's adapter, if any)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    tokens = []
    for ids in PROMPTS:
        async with registry.request(model) as route:
            final = None
            prompt = TokensPrompt(prompt_token_ids=ids)
            async for output in engine.generate(prompt, params, uuid.uuid4().hex, route.adapter):
                final = output
        assert final is not None
        tokens.append(list(final.outputs[0].token_ids))
    return tokens


def test_concat_merge_in_the_weights_serves_every_model_as_before(live: Live, tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "store", fingerprint_model(live.model_dir), base_model="tiny")
    first, second = _concat_task(live.w0, seed=10), _concat_task(live.w0, seed=11)
    meta = {"method": "lori-d"}

    def served(sync: AdapterSync, registry: ModelRegistry, models: list[str]) -> dict[str, list[list[int]]]:
        live.run(sync.sync())
        assert sync.status.last_error is None, sync.status.last_error
        return {model: live.run(_route_greedy(live.engine, registry, model)) for model in models}

    # What the concat LoRA served before, on W0: after one task (m1) and after two (m2).
    as_lora = ModelRegistry("base")
    lora = AdapterSync(
        live.engine, as_lora, store, tmp_path / "cache", max_lora_rank=64, dense_serving="lora"
    )
    m1 = store.publish("first", first, meta, merge="concat").merge.id
    before_m1 = served(lora, as_lora, ["continual", "first"])
    m2 = store.publish("second", second, meta, merge="concat").merge.id
    before = served(lora, as_lora, ["continual", "first", "second"])
    assert before["continual"] != live.base_tokens and before["first"] != before["second"]
    for handle in lora.adapters.handles():
        live.run(live.engine.remove_adapter(handle))

    registry = ModelRegistry("base")
    sync = AdapterSync(
        live.engine, registry, store, tmp_path / "cache", max_lora_rank=64,
        dense_serving="weights", base_model_dir=live.model_dir,
    )  # fmt: skip
    qkv, vector = (
        "model.layers.1.self_attn.qkv_proj",
        torch.randn(256, generator=torch.Generator().manual_seed(7)),
    )
    try:
        now = served(sync, registry, ["continual", "base", "first", "second"])
        assert now["continual"] == before["continual"], "the weights must serve what the concat LoRA did"
        assert now["base"] == live.base_tokens, "base as a correction must be the plain base model"
        assert now["first"] == before["first"] and now["second"] == before["second"]
        assert registry.resolve("continual").adapter is None  # no LoRA cost per token
        corrections = sync.status.corrections or {}
        assert corrections["base"]["exact"] and corrections["base"]["rank"] == 16
        assert corrections["first"]["rank"] == 8, "first = m2 − second: rank 8, not 8 + 16"
        assert registry.resolve("second").adapter is not None
        assert (sync.status.weights or {})["merge"] == m2

        store.rollback(m1)
        back = served(sync, registry, ["continual", "base", "first"])
        assert back["continual"] == before_m1["continual"] and back["first"] == before_m1["first"]
        assert back["base"] == live.base_tokens
        with pytest.raises(ModelNotFound):
            registry.resolve("second")
        probe_m1 = live.probe(qkv, vector)
        q_name = "model.layers.1.self_attn.q_proj"
        expected = (live.w0[q_name + ".weight"].float() + first.modules[q_name].delta()) @ vector
        torch.testing.assert_close(probe_m1[: expected.numel()], expected, rtol=1e-5, atol=1e-5)
        store.rollback(m2)
        live.run(sync.sync())
        store.rollback(m1)
        live.run(sync.sync())
        assert torch.equal(live.probe(qkv, vector), probe_m1), "W0 + ΔW_m1 is rebuilt from W0, bit for bit"
    finally:
        live.apply(None)
        for handle in sync.adapters.handles():
            live.run(live.engine.remove_adapter(handle))
    assert live.greedy() == live.base_tokens
