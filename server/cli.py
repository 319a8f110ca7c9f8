"""The ``lamina`` command line: ``serve`` runs the API server; later commands run the worker,
the demo and the benchmarks. Heavy imports happen inside each command."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from trainer.base_model.cli import model_app
from trainer.benchmark_cli import bench_app

app = typer.Typer(help="Lamina: an LLM server that keeps learning.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(model_app, name="model")


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    from server.request_id import install_log_records

    install_log_records()  # every record carries the request id it was written for ("-": none)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind (LAMINA_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind (LAMINA_PORT).")] = None,
    model: Annotated[Path | None, typer.Option(help="Base model directory (LAMINA_MODEL).")] = None,
) -> None:
    """Run the OpenAI-compatible server on the vLLM engine until Ctrl-C."""
    import uvicorn

    from server.app import create_app
    from server.settings import ServerSettings

    overrides = {k: v for k, v in {"host": host, "port": port, "model": model}.items() if v is not None}
    settings = ServerSettings(**overrides)  # type: ignore[arg-type]
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


@app.command()
def worker(
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Run the training worker (Celery; concurrency 1, acks_late, prefetch 1)."""
    from trainer.worker import celery, settings

    celery.worker_main(
        [
            "worker",
            "--concurrency=1",
            "--prefetch-multiplier=1",
            "-Q",
            settings.queue,
            f"--loglevel={loglevel}",
            "--hostname=lamina@%h",
            "--without-gossip",
            "--without-mingle",
        ]
    )


@app.command()
def demo(
    port: Annotated[int, typer.Option(help="Port of the demo server.")] = 8000,
) -> None:
    """Server + worker on the embedded model, no external services (Ctrl-C stops both)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "LAMINA_PORT": str(port)}
    worker_process = subprocess.Popen([sys.executable, "-m", "server", "worker"], env=env)
    try:
        os.environ["LAMINA_PORT"] = str(port)
        typer.echo(f"Lamina demo: http://127.0.0.1:{port}/v1 (model names: base, continual, your tasks)")
        serve(host=None, port=port, model=None)
    finally:
        worker_process.terminate()
        worker_process.wait(timeout=30)


@app.command()
def train(
    name: Annotated[str, typer.Argument(help="The task's name (becomes a model name).")],
    file: Annotated[Path, typer.Argument(help="JSONL file, one {prompt, completion} per line.", exists=True)],
    method: Annotated[str | None, typer.Option(help="Method preset, e.g. lori-s, ps-lora.")] = None,
    hyperparameters: Annotated[str, typer.Option(help="JSON object of hyper-parameters.")] = "{}",
    url: Annotated[str, typer.Option(help="Lamina server.")] = "http://127.0.0.1:8000",
) -> None:
    """Post a task to a running server and follow its training with a progress bar."""
    import time

    import httpx
    from tqdm import tqdm

    data = {"name": name, "hyperparameters": hyperparameters, **({"method": method} if method else {})}
    with file.open("rb") as handle:
        response = httpx.post(f"{url}/tasks", data=data, files={"file": handle}, timeout=60)
    if response.status_code != 202:
        typer.echo(f"refused ({response.status_code}): {response.json()['error']['message']}", err=True)
        raise typer.Exit(1)
    job = response.json()
    with tqdm(total=1, desc=f"{name} ({job['method']})", unit="step") as bar:
        while job["status"] not in ("succeeded", "failed", "cancelled"):
            time.sleep(0.5)
            job = httpx.get(f"{url}/tasks/{job['id']}", timeout=30).json()
            progress = job.get("progress") or {}
            if progress:
                bar.total = progress["total"]
                bar.n = progress["step"]
                bar.set_postfix(status=job["status"], loss=progress.get("loss"))
                bar.refresh()
    typer.echo(f"{job['status']}: {job.get('task_version') or job.get('error')}")
    if job["status"] != "succeeded":
        raise typer.Exit(1)


@app.command()
def stats(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the JSON the admin endpoint serves.")
    ] = False,
) -> None:
    """Print the store's occupancy and interference statistics (the admin view) as tables."""
    import json

    from rich.console import Console
    from rich.table import Table

    from adapters_store.fingerprint import fingerprint_model
    from adapters_store.stats_cache import stats_for_store
    from adapters_store.store import AdapterStore
    from trainer.settings import LaminaSettings

    settings = LaminaSettings()
    data = stats_for_store(AdapterStore(settings.store_dir, fingerprint_model(settings.model)))
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    console = Console()
    agg = data["aggregate"]
    if not data["tasks"]:
        console.print("The store has no live task.")
        return

    def fmt(value: object) -> str:
        return "–" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    summary = Table(title=f"Store {settings.store_dir} — live merge {data['store_version']['merge']}")
    for column in ("occupancy", "B positions free", "mask overlap (mean)", "ACR ΔW", "ACR B"):
        summary.add_column(column, justify="right")
    summary.add_row(
        *(fmt(agg[k]) for k in ("occupancy", "b_positions_free", "mask_overlap_mean", "acr_dw", "acr_b"))
    )
    console.print(summary)

    by_eps = Table(title="ACR at several ε (active: |x| > ε · max |x|)")
    for column in ("ε", "ACR ΔW", "ACR B"):
        by_eps.add_column(column, justify="right")
    for eps, acr_dw in agg["acr_dw_by_eps"].items():
        by_eps.add_row(eps, fmt(acr_dw), fmt(agg["acr_b_by_eps"][eps]))
    console.print(by_eps)

    per_task = Table(title="Per task")
    for column in ("task", "share", "OO", "AWOM", "sparsity", "eff. rank", "sign same", "sign opposite"):
        per_task.add_column(column, justify="right")
    for i, task in enumerate(data["tasks"]):
        keys = (
            "task_share",
            "oo_per_task",
            "awom_per_task",
            "sparsity",
            "effective_rank",
            "sign_same",
            "sign_opposite",
        )
        per_task.add_row(task, *(fmt(agg[k][i]) for k in keys))
    console.print(per_task)

    collisions = Table(title="Collision rate CR_ij in ΔW space")
    collisions.add_column("")
    for task in data["tasks"]:
        collisions.add_column(task, justify="right")
    for task, row in zip(data["tasks"], agg["cr_dw"], strict=True):
        collisions.add_row(task, *(fmt(v) for v in row))
    console.print(collisions)

    if data.get("subspace"):
        protected = data["subspace"]
        reserved = Table(title=f"inflora: input directions reserved per module (ε = {protected['energy']})")
        for column in ("module", "reserved", "d_in", "occupancy"):
            reserved.add_column(column, justify="right")
        for name, module in protected["modules"].items():
            reserved.add_row(name, str(module["reserved"]), str(module["d_in"]), fmt(module["occupancy"]))
        console.print(reserved)

    modules = Table(title="Per module")
    for column in ("module", "occupancy", "ACR ΔW", "ACR B"):
        modules.add_column(column, justify="right")
    for name, module in data["modules"].items():
        modules.add_row(name, fmt(module["occupancy"]), fmt(module["acr_dw"]), fmt(module["acr_b"]))
    console.print(modules)
