"""``lamina bench ...``: the benchmarks' command line, a Typer sub-app.

The main CLI mounts it (through the thin :mod:`trainer.benchmark_cli`) with
``app.add_typer(bench_app, name="bench")``. Heavy imports (torch, transformers) happen inside
the command, so ``lamina --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from tqdm import tqdm

bench_app = typer.Typer(
    help="Benchmarks: measure what Lamina's methods learn and forget.", no_args_is_help=True
)


@bench_app.callback()
def _bench() -> None:
    """Benchmarks: measure what Lamina's methods learn and forget."""


class TqdmProgress:
    """Two bars: trainings done over the whole benchmark, and steps of the current training."""

    def __init__(self) -> None:
        self.overall: tqdm | None = None
        self.current: tqdm | None = None

    def stage(self, done: int, total: int, label: str) -> None:
        if self.overall is None:
            self.overall = tqdm(total=total, desc="trainings", position=0, dynamic_ncols=True)
        self.overall.n = done
        self.overall.refresh()
        if self.current is not None:
            self.current.close()
        self.current = tqdm(desc=label, position=1, leave=False, dynamic_ncols=True)

    def step(self, step: int, total: int, loss: float) -> None:
        bar = self.current
        if bar is None:
            return
        bar.total = total
        bar.n = step
        bar.set_postfix(loss=f"{loss:.3f}", refresh=True)

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
        if self.overall is not None:
            self.overall.n = self.overall.total or self.overall.n  # every training done
            self.overall.refresh()
            self.overall.close()


def _methods(value: str) -> tuple[str, ...]:
    from bench.continual.config import ALL_METHODS

    if value.strip().lower() == "all":
        return ALL_METHODS
    return tuple(name.strip().lower() for name in value.split(",") if name.strip())


def _model_dir(value: str) -> Path:
    """``--model`` as ``LAMINA_MODEL`` reads it: a directory, or a name from ``lamina model install``."""
    from trainer.base_model.catalog import ModelNotInstalledError, resolve_model
    from trainer.base_model.cli import lamina_home

    try:
        return resolve_model(value, lamina_home())
    except ModelNotInstalledError as error:
        raise typer.BadParameter(str(error), param_hint="--model") from error


def _override(item: str) -> tuple[str, Any]:
    """``name=value`` with the value read as JSON when it is JSON (numbers, lists), else text."""
    name, _, text = item.partition("=")
    try:
        return name.strip(), json.loads(text)
    except json.JSONDecodeError:
        return name.strip(), text


@bench_app.command("continual")
def continual(
    methods: Annotated[
        str, typer.Option(help="Comma-separated presets, e.g. 'seq-lora,lori-s'; 'all' for every one.")
    ] = "all",
    order: Annotated[
        int,
        typer.Option(
            help="Task order 1-7 (1-3: four tasks; 4-6: fifteen; 7: fifteen a small real model learns, 50 test prompts each)."
        ),
    ] = 1,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick/--full",
            help="quick: seeds 0-2, 50 test examples (order 1: < 30 min on 2 CPU cores); "
            "full: seeds 0-4 and 100 test examples (GPU).",
        ),
    ] = True,
    out: Annotated[Path, typer.Option(help="Directory for continual-order<N>.{md,json,png}.")] = Path(
        "bench/results"
    ),
    steps: Annotated[int | None, typer.Option(help="Override every task's training steps.")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Run this one training seed instead of the preset's.")
    ] = None,
    n_tasks: Annotated[int | None, typer.Option(help="Only the order's first N tasks.")] = None,
    n_test: Annotated[
        int | None, typer.Option(help="Test examples per task (preset: 50 quick, 100 full).")
    ] = None,
    no_upper_bound: Annotated[
        bool,
        typer.Option("--no-upper-bound", help="Skip training each task alone (then FWT is not reported)."),
    ] = False,
    model: Annotated[
        str | None,
        typer.Option(
            help="Base model directory or installed catalogue name, e.g. smollm2-135m-instruct "
            "(default: the embedded model)."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="'auto' (CUDA if available), 'cpu' or 'cuda'.")] = "auto",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice).")] = None,
    work_dir: Annotated[
        Path | None, typer.Option(help="Keep the adapter stores here (default: a temporary directory).")
    ] = None,
    training: Annotated[
        str | None,
        typer.Option(
            help="'table': the per-task steps/lr/batch tuned on the embedded model, the same for every "
            "method; 'auto': trainer.auto's rules, what a user who sets nothing gets (default: table for "
            "the embedded model, auto for any other)."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="A hyper-parameter for every task, e.g. --set subspace_energy=0.99."),
    ] = None,
    routing: Annotated[
        str,
        typer.Option(
            help="What `continual` serves per prompt, as the server's LAMINA_CONTINUAL_ROUTING: task "
            "(default: the matching task's own model, the base for the rest), merge (the merge for prompts "
            "like a task's), off (the merge for everything)."
        ),
    ] = "task",
    no_general: Annotated[
        bool,
        typer.Option("--no-general", help="Skip the general-ability set (trainer/suite/general.py)."),
    ] = False,
    no_probe: Annotated[
        bool, typer.Option("--no-probe", help="Skip the general-ability probe (trainer/suite/probe.py).")
    ] = False,
    max_lora_rank: Annotated[
        int | None,
        typer.Option(
            help="Admission's engine limit, as LAMINA_MAX_LORA_RANK (default: a default server's); "
            "orders 4-6 need 128 for a concat merge of 15 rank-8 tasks."
        ),
    ] = None,
    loraf_grow_rank: Annotated[
        int | None,
        typer.Option(
            help="LoRAF stores grow by this rank when full, as LAMINA_LORAF_GROW_RANK (default: a default server's)."
        ),
    ] = None,
) -> None:
    """Train methods task after task, evaluate every seen task after each, report AA/BWT/FWT/FR."""
    from bench.continual.config import BenchmarkConfig
    from bench.continual.runner import run_benchmark
    from bench.continual.writers import markdown_table, write_all

    overrides: dict[str, Any] = {
        "methods": _methods(methods),
        "order": order,
        "steps": steps,
        "n_tasks": n_tasks,
        "upper_bound": not no_upper_bound,
        "device": device,
        "threads": threads,
        "work_dir": work_dir,
        "training": training or ("table" if model is None else "auto"),
        "probe": not no_probe,
        "general": not no_general,
        "routing": routing,
        "overrides": tuple(_override(item) for item in set_ or []),
    }
    if seed is not None:
        overrides["seeds"] = (seed,)
    if n_test is not None:
        overrides["n_test"] = n_test
    if model is not None:
        overrides["model_dir"] = _model_dir(model)
    if max_lora_rank is not None:
        overrides["max_lora_rank"] = max_lora_rank
    if loraf_grow_rank is not None:
        overrides["loraf_grow_rank"] = loraf_grow_rank
    try:
        config = BenchmarkConfig.quick(**overrides) if quick else BenchmarkConfig.full(**overrides)
    except (ValueError, KeyError) as error:
        raise typer.BadParameter(str(error)) from error

    progress = TqdmProgress()
    try:
        result = run_benchmark(config, progress)
    finally:
        progress.close()
    paths = write_all(result, out)
    typer.echo(markdown_table(result))
    typer.echo(
        f"\nwall time {result.wall_seconds / 60:.1f} min; wrote " + ", ".join(str(p) for p in paths.values())
    )
