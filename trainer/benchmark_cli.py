"""Where the main CLI finds ``lamina bench``: the benchmarks live in ``bench/`` beside the other
benchmarks (``bench/continual``), not in the trainer.

``bench`` is installed with Lamina (pyproject.toml lists ``bench`` and ``bench.continual``), so
an installed checkout gets the real command. An install without it (the Docker images copy
only the three service packages) gets a ``bench`` command that says where to run it instead of
a CLI that fails to start.
"""

from __future__ import annotations

import typer

try:
    from bench.continual.cli import bench_app
except ModuleNotFoundError as error:  # only a missing bench package; a broken one still raises
    if error.name not in ("bench", "bench.continual", "bench.continual.cli"):
        raise
    bench_app = typer.Typer(help="Benchmarks (not installed here).", no_args_is_help=True)
    _EVERY_OPTION = {"allow_extra_args": True, "ignore_unknown_options": True}

    @bench_app.command("continual", context_settings=_EVERY_OPTION)
    def _missing() -> None:
        """Not installed here: the benchmarks run from a source checkout."""
        raise typer.BadParameter(
            "the benchmarks live in the source checkout's bench/ directory, which this install lacks: "
            "pip install -e . from a checkout of Lamina, then run lamina bench continual there"
        )


__all__ = ["bench_app"]

if __name__ == "__main__":  # `python -m trainer.benchmark_cli continual ...` before the main CLI mounts it
    bench_app()
