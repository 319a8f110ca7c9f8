"""What every benchmark records next to its numbers: the machine, the commit, the date.

A number without the machine it came from is not a result; each ``bench/*/run.py`` builds its
JSON with :func:`envelope` and writes it with :func:`write_result`. The machine and commit come
from :mod:`bench.provenance`, which the continual benchmark uses too: one header, one set of keys.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.provenance import commit, machine

__all__ = ["RESULTS", "commit", "envelope", "machine", "markdown_table", "write_result"]

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def envelope(benchmark: str, config: dict[str, Any]) -> dict[str, Any]:
    """The header of a result: which benchmark, with what settings, where and when."""
    return {
        "benchmark": benchmark,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "commit": commit(),
        "config": config,
    }


def write_result(result: dict[str, Any], path: Path, markdown: str | None = None) -> None:
    """The JSON at ``path`` and, when given, its Markdown report beside it (``.md``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    if markdown is not None:
        path.with_suffix(".md").write_text(markdown)
        print(f"wrote {path.with_suffix('.md')}")


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured table; floats to 3 significant digits."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(result: dict[str, Any]) -> str:
    """One line for a report: the machine, its load, the commit and the date of a result."""
    m = result["machine"]
    gpu = f", GPU {m['gpu']}" if "gpu" in m else ""
    return (
        f"{m['cpu_model']}, {m['cores']} cores{gpu}, torch {m['torch']}, load average at start "
        f"{m['load_average_at_start'][0]:.2f}, at end {m.get('load_average_at_end', [0])[0]:.2f}; "
        f"commit {result['commit']['sha'][:10]}{' (dirty)' if result['commit']['dirty'] else ''}, {result['date']}"
    )


def report_head(title: str, result: dict[str, Any]) -> list[str]:
    """The first lines of a benchmark's Markdown report: its title, then :func:`machine_line`."""
    return [f"# {title}", "", f"Machine: {machine_line(result)}", ""]
