"""What every benchmark records next to its numbers: the machine, the load on it, the commit.

A number without the machine it came from is not a result. One module writes this header for
every benchmark (``bench/report.py``'s envelope, ``bench/continual``), with one set of keys:
``cpu_model``, ``cores``, ``torch_threads``, ``torch``, ``python``, ``platform``, ``device`` (when
known), ``gpu`` (when CUDA ran or is present), ``load_average_at_start`` (1, 5, 15 min).
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def machine(device: str | None = None) -> dict[str, Any]:
    """CPU model, cores, torch threads and versions, the device that ran (``device``, e.g.
    ``"cpu"`` or ``"cuda:0"``; None: the GPU is named when torch sees one), and the load now."""
    import torch

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": load_average(),
    }
    if device is not None:
        info["device"] = device
    if (device is None and torch.cuda.is_available()) or (device or "").startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device) if device else 0)
    return info


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages: on a shared machine, wall times mean little without them."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what the platform module reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> dict[str, Any]:
    """HEAD and whether tracked files have changes (untracked files are not seen); a sha of None
    outside git."""
    try:
        sha = _git("rev-parse", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return {"sha": None, "dirty": False}
    return {"sha": sha, "dirty": dirty}


def commit_label() -> str | None:
    """:func:`commit` as one string, ``<sha>`` or ``<sha>+dirty``; None outside git."""
    head = commit()
    if head["sha"] is None:
        return None
    return f"{head['sha']}+dirty" if head["dirty"] else str(head["sha"])


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, check=True, capture_output=True, text=True, timeout=10
    ).stdout.strip()
