"""The continual benchmark (bench/continual): metrics from a known matrix, an end-to-end run on the
embedded model (2 tasks, 2 methods, few steps), the weight restore around evaluation, the writers
and the CLI as the main CLI mounts it."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import matplotlib.image
import pytest
import torch
import typer
from typer.testing import CliRunner

from adapters_store.fingerprint import fingerprint_model
from adapters_store.lora import LoraAdapter, LoraModule
from adapters_store.store import AdapterStore
from bench.continual.config import BenchmarkConfig
from bench.continual.results import BenchmarkResult, matrix_metrics
from bench.continual.runner import (
    NoCapacity,
    _Context,
    _Silent,
    add_task,
    evaluate_task,
    live_deltas,
    load_suite,
    run_benchmark,
)
from bench.continual.writers import load_result, write_all
from bench.report import envelope
from trainer.benchmark_cli import bench_app
from trainer.contract.settings import LaminaSettings
from trainer.loop import load_base
from trainer.served import merged_into
from trainer.suite import get_order

# acc[i][j]: task j after training task i. Row 0 also holds task 1 before it is trained, row 1
# task 2 before it is trained (the entries FWT0 reads).
KNOWN = [
    [0.90, 0.20, None],
    [0.95, 0.80, 0.10],
    [0.30, 0.70, 1.00],
]
SCRATCH = [0.90, 0.90, 0.80]  # each task trained alone
ZERO_SHOT = [0.00, 0.10, 0.00]


def test_metrics_of_a_known_matrix_match_hand_computed_values() -> None:
    metrics = matrix_metrics(KNOWN, SCRATCH, ZERO_SHOT)
    assert metrics["AA"] == pytest.approx((0.30 + 0.70 + 1.00) / 3)
    assert metrics["BWT"] == pytest.approx(((0.30 - 0.90) + (0.70 - 0.80)) / 2)  # -0.35
    # FR starts from each task's best accuracy, task 0's is after task 1 (0.95), not 0.90
    assert metrics["FR"] == pytest.approx(((0.95 - 0.30) + (0.80 - 0.70)) / 2)  # 0.375
    assert metrics["FWT"] == pytest.approx(((0.80 - 0.90) + (1.00 - 0.80)) / 2)  # 0.05
    assert metrics["FWT0"] == pytest.approx(((0.20 - 0.10) + (0.10 - 0.00)) / 2)  # 0.10


def test_forward_transfers_are_absent_without_their_references() -> None:
    without_next = [[0.9, None], [0.5, 0.8]]
    metrics = matrix_metrics(without_next, None, [0.0, 0.0])
    assert metrics["FWT"] is None and metrics["FWT0"] is None
    assert metrics["FR"] == pytest.approx(0.4) and metrics["BWT"] == pytest.approx(-0.4)


@pytest.fixture(scope="module")
def base(base_model_dir: Path):  # type: ignore[no-untyped-def]
    return load_base(base_model_dir)


def test_merged_into_changes_outputs_and_restores_w0_bit_for_bit(base) -> None:  # type: ignore[no-untyped-def]
    model, _ = base
    name = "model.layers.0.self_attn.q_proj"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[0, 5, 6, 7]])
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    weight = model.get_submodule(name).weight
    delta = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    with merged_into(model, {name: delta}), torch.no_grad():
        assert torch.allclose(model.get_submodule(name).weight, before[f"{name}.weight"] + delta)
        assert not torch.allclose(model(input_ids=ids).logits, reference)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    with pytest.raises(RuntimeError), merged_into(model, {name: delta}):
        raise RuntimeError("evaluation failed")
    assert torch.equal(model.get_submodule(name).weight, before[f"{name}.weight"])


@pytest.fixture(scope="module")
def small_run(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> BenchmarkResult:
    """Order 1's first two tasks, seq-lora and lori-s, 20 steps each, stores kept for inspection."""
    config = BenchmarkConfig(
        methods=("seq-lora", "lori-s"),
        n_tasks=2,
        steps=20,
        n_test=12,
        model_dir=base_model_dir,
        work_dir=tmp_path_factory.mktemp("stores"),
        threads=1,  # 2 threads on a shared 2-core CI box oversubscribe and run several times slower
        general_samples=24,  # the plumbing, not the resolution: a real run samples 800
        general_questions=30,  # and keeps every candidate question
        routing="off",  # every prompt on the live merge, which the matrix test below recomputes
        cache=tmp_path_factory.mktemp("cache"),
    )
    threads = torch.get_num_threads()
    result = run_benchmark(config)
    assert torch.get_num_threads() == threads  # the process-wide setting is put back
    return result


def test_end_to_end_fills_the_matrix_and_its_metrics(small_run: BenchmarkResult) -> None:
    assert small_run.tasks == list(get_order(1)[:2])
    assert small_run.test_sizes == [12, 12]
    assert [(r.method, r.seed) for r in small_run.runs] == [("seq-lora", 0), ("lori-s", 0)]
    assert len(small_run.upper_bound[0]) == 2
    assert small_run.machine["torch_threads"] == 1
    for run in small_run.runs:
        acc = run.accuracy
        filled = [(i, j) for i in range(2) for j in range(2) if acc[i][j] is not None]
        assert filled == [(0, 0), (0, 1), (1, 0), (1, 1)]  # lower triangle + the next task
        assert all(0.0 <= acc[i][j] <= 1.0 for i, j in filled)  # type: ignore[operator]
        expected = matrix_metrics(acc, small_run.upper_bound[0], small_run.zero_shot)
        assert {k: run.metrics[k] for k in expected} == pytest.approx(expected)
        assert run.train_seconds > 0 and len(run.final_losses) == 2
    # 20 steps teach the first task something the base model cannot do at all
    assert small_run.zero_shot[0] == 0.0
    assert max(run.accuracy[0][0] for run in small_run.runs) > 0.5  # type: ignore[type-var]


def test_matrix_entries_are_the_live_merge_of_the_published_store(small_run: BenchmarkResult, base) -> None:  # type: ignore[no-untyped-def]
    """Re-open the lori-s store the run published into: two live tasks, a concat merge, and the
    final row of the matrix is what that merge scores."""
    model, tokenizer = base
    config = small_run.config
    assert config.work_dir is not None
    root = next(config.work_dir.glob("lori-s-seed0-*"))
    store = AdapterStore(root, fingerprint_model(config.model_dir))
    assert [t.name for t in store.tasks()] == small_run.tasks
    live = store.live()
    assert live is not None and live.method == "concat"
    suite = load_suite(config)
    run = small_run.runs_of("lori-s")[0]
    with merged_into(model, live_deltas(store)):
        for j, task in enumerate(suite.tasks):
            assert evaluate_task(model, tokenizer, task, suite.test[j], 64) == run.accuracy[1][j]


def test_writers_produce_valid_json_markdown_and_png(small_run: BenchmarkResult, tmp_path: Path) -> None:
    paths = write_all(small_run, tmp_path)
    assert {p.name for p in paths.values()} == {f"continual-order1.{ext}" for ext in ("md", "json", "png")}

    document = json.loads(paths["json"].read_text())
    assert document["machine"]["cores"] >= 1 and document["machine"]["cpu_model"]
    # one provenance module: the continual header has every key the other benchmarks' has
    assert set(envelope("x", {})["machine"]) - {"gpu"} <= set(document["machine"])
    assert len(document["machine"]["load_average_at_start"]) == 3
    assert "git_commit" in document and document["config"]["methods"] == ["seq-lora", "lori-s"]
    assert document["runs"][0]["accuracy"] == small_run.runs[0].accuracy
    assert set(document["summary"]) == {"seq-lora", "lori-s"}
    assert set(document["task_training"]) == set(small_run.tasks)

    markdown = paths["md"].read_text()
    assert (
        "| method | AA ↑ | BWT ↑ | FWT ↑ | FWT0 ↑ | FR ↓ | GA ↑ | agree ↑ | KL ↓ | known ↑ | ACR | occupancy | train s |"
        in markdown
    )
    assert document["general_size"]["prompts"] >= 24
    for run in document["runs"]:  # the general-ability set scored after every task, with its interval
        assert len(run["general"]) == 2
        agreement = run["general"][-1]["agreement"]
        assert agreement["low"] <= agreement["value"] <= agreement["high"] and agreement["n"] >= 24
    assert document["probe_size"] == small_run.probe_size > 0  # the embedded model knows a few sums
    assert all(len(run["probe"]) == len(small_run.tasks) for run in document["runs"])
    assert "| seq-lora |" in markdown and "| lori-s |" in markdown and "### lori-s" in markdown

    image = matplotlib.image.imread(paths["png"])
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100

    reloaded = load_result(paths["json"])  # redrawing needs no retraining
    assert reloaded.summary() == small_run.summary() and reloaded.config == small_run.config


def test_cli_runs_a_one_task_benchmark(base_model_dir: Path, tmp_path: Path) -> None:
    app = typer.Typer()
    app.add_typer(bench_app, name="bench")  # how the main CLI mounts it
    args = ["bench", "continual", "--methods", "seq-lora", "--n-tasks", "1", "--steps", "2", "--n-test", "4"]
    args += [
        "--seed",
        "0",
        "--no-upper-bound",
        "--no-general",
        "--model",
        str(base_model_dir),
        "--out",
        str(tmp_path),
    ]
    args += ["--max-lora-rank", "128", "--loraf-grow-rank", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "| seq-lora |" in result.output
    config = json.loads((tmp_path / "continual-order1.json").read_text())["config"]
    assert (config["n_tasks"], config["seeds"], config["preset"]) == (1, [0], "quick")
    assert (config["max_lora_rank"], config["loraf_grow_rank"]) == (128, 2)  # admission's limits, recorded


def test_cli_refuses_an_unknown_method(tmp_path: Path) -> None:
    app = typer.Typer()
    app.add_typer(bench_app, name="bench")
    result = CliRunner().invoke(
        app, ["bench", "continual", "--methods", "seq-lora,nope", "--out", str(tmp_path)]
    )
    assert result.exit_code != 0
    assert "nope" in result.output


def test_admission_limits_are_a_default_servers_unless_the_run_sets_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for variable in ("LAMINA_MAX_LORA_RANK", "LAMINA_LORAF_GROW_RANK"):
        monkeypatch.delenv(variable, raising=False)
    server = LaminaSettings()
    config = BenchmarkConfig(methods=("inc-lora",))
    assert (config.max_lora_rank, config.loraf_grow_rank) == (server.max_lora_rank, server.loraf_grow_rank)
    with pytest.raises(ValueError, match="max_lora_rank"):
        BenchmarkConfig(methods=("inc-lora",), max_lora_rank=100)  # not a vLLM slot size
    with pytest.raises(ValueError, match="loraf_grow_rank"):
        BenchmarkConfig(methods=("inc-lora",), loraf_grow_rank=-1)


def test_a_task_the_store_has_no_room_for_is_refused_by_admission(tmp_path: Path) -> None:
    """The benchmark admits each task as the worker does: a concat merge already at the run's
    engine limit refuses the next task before any training (no model is needed to see it)."""
    config = BenchmarkConfig(methods=("inc-lora",), n_tasks=1, n_test=4, upper_bound=False, probe=False)
    store = AdapterStore(tmp_path / "store", "fp")
    rank = config.max_lora_rank
    A, B = torch.zeros(rank, 4), torch.zeros(4, rank)
    store.publish(
        "full", LoraAdapter({"m": LoraModule(A=A, B=B, scale=1.0)}), {"method": "inc-lora"}, "concat"
    )
    ctx = _Context(config, None, None, "fp", load_suite(config), tmp_path, _Silent())  # type: ignore[arg-type]
    with pytest.raises(NoCapacity, match="max_lora_rank"):
        add_task(ctx, store, "inc-lora", 0, seed=0, label="refused")
    assert [t.name for t in store.tasks()] == ["full"]


def test_the_runs_engine_limit_is_the_one_admission_applies(tmp_path: Path, base) -> None:  # type: ignore[no-untyped-def]
    """Rank-8 tasks under max_lora_rank 8: the first fits, the second's concat (16) is refused;
    the same store under 16 takes it, published with the run's order and seed."""
    model, tokenizer = base
    config = BenchmarkConfig(
        methods=("inc-lora",),
        n_tasks=2,
        n_test=4,
        steps=1,
        upper_bound=False,
        probe=False,
        max_lora_rank=8,
        cache=tmp_path / "cache",  # the routing samples of base "fp" stay out of $LAMINA_HOME
    )
    store = AdapterStore(tmp_path / "store", "fp")
    ctx = _Context(config, model, tokenizer, "fp", load_suite(config), tmp_path, _Silent())
    add_task(ctx, store, "inc-lora", 0, seed=0, label="fits")
    with pytest.raises(NoCapacity, match="max_lora_rank 8"):
        add_task(ctx, store, "inc-lora", 1, seed=0, label="refused")
    wider = replace(config, max_lora_rank=16)
    ctx = _Context(wider, model, tokenizer, "fp", load_suite(wider), tmp_path, _Silent())
    seconds, metrics = add_task(ctx, store, "inc-lora", 1, seed=0, label="admitted")
    assert [t.name for t in store.tasks()] == list(get_order(1)[:2])
    assert seconds > 0 and "final_loss" in metrics
    assert store.tasks()[-1].meta["benchmark"] == {"order": 1, "seed": 0}


SHIM_WITHOUT_BENCH = """
import sys
from importlib.abc import MetaPathFinder

class NoBench(MetaPathFinder):  # an install without the bench package (the Docker images)
    def find_spec(self, name, path=None, target=None):
        if name == "bench" or name.startswith("bench."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoBench())
import typer
from typer.testing import CliRunner
from trainer.benchmark_cli import bench_app

app = typer.Typer()
app.add_typer(bench_app, name="bench")
result = CliRunner().invoke(app, ["bench", "continual"])
assert result.exit_code != 0 and "source checkout" in result.output, result.output
"""


def test_without_the_bench_package_the_cli_starts_and_says_where_the_benchmarks_are() -> None:
    done = subprocess.run([sys.executable, "-c", SHIM_WITHOUT_BENCH], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
