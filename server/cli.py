"""The ``lamina`` command line: ``serve`` runs the API server, ``demo`` the server and a worker;
``train`` and ``tasks`` talk to a running server over HTTP. The trainer's commands (``worker``,
``model``, ``bench``) are mounted from the ``lamina.commands`` entry points (pyproject.toml), so
this module imports nothing from ``trainer`` but its contract. Heavy imports happen inside each
command.

A bad ``LAMINA_*`` setting, a path that is not a store, or a server that cannot be reached or
refuses a request ends the command with one line on stderr naming the variable, the path or the
URL (exit code 2 for a setting or a path, 1 for the server), never a traceback.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn, TypeVar

import typer

from trainer.contract.settings import setting_error

if TYPE_CHECKING:
    import httpx

    from trainer.contract.settings import LaminaSettings

COMMANDS_GROUP = "lamina.commands"

app = typer.Typer(help="Lamina: an LLM server that keeps learning.", no_args_is_help=True)
tasks_app = typer.Typer(help="Training jobs on a running server: list, show, cancel.", no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")

Settings = TypeVar("Settings", bound="LaminaSettings")

# How the client commands find the server and authenticate (the server's LAMINA_API_KEYS).
Url = Annotated[str, typer.Option(envvar="LAMINA_URL", help="The Lamina server.")]
ApiKey = Annotated[
    str | None,
    typer.Option(
        envvar="LAMINA_API_KEY",
        help="Bearer key, one of the server's LAMINA_API_KEYS (or its admin key).",
        show_default=False,
    ),
]
DEFAULT_URL = "http://127.0.0.1:8000"


def fail(message: str, code: int = 1) -> NoReturn:
    """End the command with one line on stderr."""
    typer.echo(f"lamina: {message}", err=True)
    raise typer.Exit(code)


def load_settings(cls: type[Settings], **overrides: Any) -> Settings:
    """``cls()`` from the ``LAMINA_*`` environment; a bad value ends the command naming it."""
    from pydantic import ValidationError

    try:
        return cls(**overrides)
    except ValidationError as error:
        fail(setting_error(error), 2)


def require_model(settings: LaminaSettings) -> None:
    """The base model directory must hold a Hugging Face model before anything loads it."""
    if not (settings.model / "config.json").is_file():
        fail(f"LAMINA_MODEL: {settings.model} holds no model (no config.json)", 2)


class ServerClient:
    """The few HTTP calls the client commands make; every failure is one line naming the URL."""

    def __init__(self, url: str, api_key: str | None) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def call(self, method: str, path: str, *, ok: tuple[int, ...] = (200,), **kwargs: Any) -> Any:
        import httpx

        kwargs.setdefault("timeout", 30)
        try:
            response = httpx.request(method, f"{self.url}{path}", headers=self.headers, **kwargs)
        except (httpx.HTTPError, httpx.InvalidURL) as error:
            reason = str(error) or type(error).__name__
            fail(f"cannot reach the Lamina server at {self.url} ({reason}); set --url or LAMINA_URL")
        if response.status_code not in ok:
            fail(f"{method} {self.url}{path}: {response.status_code} {_error_message(response)}")
        return response.json()


def _error_message(response: httpx.Response) -> str:
    """The server's own message (OpenAI's error shape), or the start of the body."""
    try:
        message = str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = response.text.strip()[:200] or response.reason_phrase
    if response.status_code == 401:
        message += " Pass --api-key or set LAMINA_API_KEY."
    return message


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    from server.request_id import install_log_records
    from trainer.contract.logs import configure_logging

    install_log_records()  # every record carries the request id it was written for ("-": none)
    configure_logging("text", logging.DEBUG if verbose else logging.INFO)  # serve/worker: LAMINA_LOG_FORMAT
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise


def _use_log_format(log_format: Literal["text", "json"]) -> None:
    """Switch to the settings' log format, keeping the level ``--verbose`` chose."""
    from trainer.contract.logs import use_log_format

    use_log_format(log_format)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind (LAMINA_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind (LAMINA_PORT).")] = None,
    model: Annotated[Path | None, typer.Option(help="Base model directory (LAMINA_MODEL).")] = None,
) -> None:
    """Run the OpenAI-compatible server on the vLLM engine until Ctrl-C or SIGTERM, which drain
    the requests in flight (up to LAMINA_DRAIN_TIMEOUT_S) before the engine stops."""
    import uvicorn

    from server.app import create_app
    from server.settings import ServerSettings

    overrides = {k: v for k, v in {"host": host, "port": port, "model": model}.items() if v is not None}
    settings = load_settings(ServerSettings, **overrides)
    require_model(settings)
    from trainer.contract.backends import database_problem

    if problem := database_problem(settings):
        fail(problem, 2)
    _use_log_format(settings.log_format)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        log_config=None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG,
        # SIGTERM / Ctrl-C: no new connections, then in-flight requests get this long to finish
        timeout_graceful_shutdown=settings.drain_timeout_s,
    )


@app.command()
def demo(
    port: Annotated[int, typer.Option(help="Port of the demo server.")] = 8000,
    model: Annotated[
        str | None,
        typer.Option(
            help="A catalogue model (`lamina model list`), e.g. smollm2-135m-instruct, installed first "
            "if missing; or a model directory. Default: LAMINA_MODEL, else the embedded model.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Server + worker on the embedded model (or --model), no external services (Ctrl-C stops both)."""
    import os

    from server.processes import start_worker

    env = {"LAMINA_PORT": str(port)}
    if model is not None:
        env["LAMINA_MODEL"] = demo_model(model)
    # Its own process group, output to this terminal; stopped (group and stragglers) on every
    # way out of the server: Ctrl-C, SIGTERM, a bad setting, a crash.
    worker = start_worker(env, log_path=None)
    try:
        os.environ.update(env)  # the server reads the same settings as the worker
        typer.echo(f"Lamina demo: http://127.0.0.1:{port}/v1 (model names: base, continual, your tasks)")
        serve(host=None, port=port, model=None)
    finally:
        worker.stop(timeout_s=30)


def demo_model(value: str) -> str:
    """The ``LAMINA_MODEL`` value for ``lamina demo --model``: a model directory as given; any
    other value is a catalogue name, installed if missing (an installed copy is only verified) by
    ``lamina model install``. That command is the trainer's (mounted through the
    ``lamina.commands`` entry points), so it runs as a subprocess: this module imports nothing of
    the trainer but its contract, and the conversion's memory is gone before the server starts.
    Its progress bar shows in the terminal, as it does for ``lamina model install``."""
    import subprocess
    import sys

    if Path(value).is_dir():
        return value
    typer.echo(
        f"lamina demo: installing {value} unless it is installed already (lamina model install {value})"
    )
    # its output, the download's progress bar included, goes to the terminal as it comes
    run = subprocess.run([sys.executable, "-m", "server", "model", "install", value])
    if run.returncode == 2:  # a usage error: no catalogue model has this name
        fail(
            f"--model {value}: not a model directory, and no catalogue model has that name "
            "(`lamina model list` shows the catalogue)",
            2,
        )
    if run.returncode != 0:
        fail(f"--model {value}: lamina model install failed (exit {run.returncode}; its error is above)")
    return value


@app.command()
def train(
    name: Annotated[str, typer.Argument(help="The task's name (becomes a model name).")],
    file: Annotated[Path, typer.Argument(help="JSONL file, one {prompt, completion} per line.", exists=True)],
    method: Annotated[str | None, typer.Option(help="Method preset, e.g. lori-s, ps-lora.")] = None,
    hyperparameters: Annotated[str, typer.Option(help="JSON object of hyper-parameters.")] = "{}",
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Post a task to a running server and follow its training with a progress bar."""
    import time

    from tqdm import tqdm

    server = ServerClient(url, api_key)
    data = {"name": name, "hyperparameters": hyperparameters, **({"method": method} if method else {})}
    with file.open("rb") as handle:
        job = server.call("POST", "/tasks", ok=(202,), data=data, files={"file": handle}, timeout=60)
    with tqdm(total=1, desc=f"{name} ({job['method']})", unit="step") as bar:
        while job["status"] not in ("succeeded", "failed", "cancelled"):
            time.sleep(0.5)
            job = server.call("GET", f"/jobs/{job['id']}")
            progress = job.get("progress") or {}
            if progress:
                bar.total = progress["total"]
                bar.n = progress["step"]
                bar.set_postfix(status=job["status"], loss=progress.get("loss"))
                bar.refresh()
    typer.echo(f"{job['status']}: {job.get('task_version') or job.get('error')}")
    if job["status"] != "succeeded":
        raise typer.Exit(1)


@tasks_app.command("list")
def tasks_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print the server's JSON.")] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Every training job, in arrival order, with its status and progress."""
    import json

    from rich.console import Console
    from rich.table import Table

    jobs = ServerClient(url, api_key).call("GET", "/jobs")["data"]
    if as_json:
        typer.echo(json.dumps(jobs, indent=2))
        return
    if not jobs:
        typer.echo("No training jobs.")
        return
    table = Table()
    for column in ("id", "name", "method", "status", "progress", "loss", "created"):
        table.add_column(column)
    for job in jobs:
        progress = job.get("progress") or {}
        loss = progress.get("loss")
        table.add_row(
            job["id"],
            job["name"],
            job["method"],
            job["status"],
            f"{progress['step']}/{progress['total']}" if progress else "",
            f"{loss:.4g}" if loss is not None else "",
            job["created_at"],
        )
    Console().print(table)


@tasks_app.command("show")
def tasks_show(
    job_id: Annotated[str, typer.Argument(help="A job id (job-…), as `lamina tasks list` shows.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """One job as the server has it: status, progress, metrics, warnings, error (JSON)."""
    import json

    typer.echo(json.dumps(ServerClient(url, api_key).call("GET", f"/jobs/{job_id}"), indent=2))


@tasks_app.command("cancel")
def tasks_cancel(
    job_id: Annotated[str, typer.Argument(help="A job id (job-…).")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Cancel a job: a queued one at once, a running one at its next step."""
    job = ServerClient(url, api_key).call("POST", f"/jobs/{job_id}/cancel")
    if job["status"] == "cancelled":
        typer.echo(f"{job['id']}: cancelled")
    elif job["cancel_requested"] and job["status"] not in ("succeeded", "failed"):
        typer.echo(f"{job['id']}: {job['status']}, stops at its next step")
    else:
        typer.echo(f"{job['id']}: already {job['status']}, nothing to cancel")


@app.command()
def stats(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the JSON the admin endpoint serves.")
    ] = False,
    png: Annotated[
        Path | None,
        typer.Option("--png", help="Also write the picture GET /admin/stats.png serves to this file."),
    ] = None,
) -> None:
    """Print the store's occupancy and interference statistics and its accuracy matrix (the
    admin view) as tables."""
    import json

    from rich.console import Console
    from rich.table import Table

    from adapters_store.evaluation import matrix_table, stats_with_accuracy
    from adapters_store.fingerprint import fingerprint_model
    from adapters_store.store import STORE_FILE, AdapterStore, FingerprintMismatch
    from trainer.contract.backends import store_backends
    from trainer.contract.settings import LaminaSettings

    settings = load_settings(LaminaSettings)
    # opening a store creates it: a file store must exist already (a database one is found by its rows)
    if not settings.database_url and not (settings.store_dir / STORE_FILE).is_file():
        fail(
            f"{settings.store_dir} is not an adapter store (no {STORE_FILE}); set LAMINA_STORE or LAMINA_HOME",
            2,
        )
    require_model(settings)
    try:
        store = AdapterStore(
            settings.store_dir, fingerprint_model(settings.model), **store_backends(settings)
        )
    except FingerprintMismatch as error:
        fail(f"{error}: LAMINA_MODEL names another base model than the store's", 2)
    data = stats_with_accuracy(store)
    if png is not None:
        from adapters_store.stats_plot import render_stats_png

        png.write_bytes(render_stats_png(data))
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

    if data["accuracy_matrix"]:  # what `continual` scored on each task as each one went live
        columns, cells = matrix_table(data["accuracy_matrix"])
        matrix = Table(title="Accuracy matrix: continual on each task (%) right after each version went live")
        matrix.add_column("after")
        for column in columns:  # the base's general answers kept first, where scored
            matrix.add_column(column, justify="right")
        for entry, row in zip(data["accuracy_matrix"], cells, strict=True):
            matrix.add_row(entry["after"], *(fmt(value) for value in row))
        console.print(matrix)

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


def mount_commands(target: typer.Typer) -> None:
    """Add the commands other packages declare under the ``lamina.commands`` entry points: a
    ``typer.Typer`` becomes a command group (``lamina model ...``), a function one command
    (``lamina worker``). The trainer declares its own (pyproject.toml), so ``lamina worker`` keeps
    working while the server's CLI never imports the trainer."""
    for entry in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        command = entry.load()
        if isinstance(command, typer.Typer):
            target.add_typer(command, name=entry.name)
        else:
            target.command(entry.name)(command)


mount_commands(app)
