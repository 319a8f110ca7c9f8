"""The picture behind ``GET /admin/stats.png``: the collision-rate matrix, the occupancy of
every module and how the collision rate depends on the threshold ε, readable at a glance.

Left: a heatmap of CR_ij in ΔW space over all modules at the primary ε (N-LoRA eq. 11; the
diagonal is each task's own share of active positions), tasks labelled oldest first, ACR (eq. 10)
in the title. Middle: one bar per module, the share of its B positions some task owns and how
many are left. Right: ACR against ε (log axis) in ΔW and in B space, because one ε alone misleads
(a comparison of two methods can flip by two orders of magnitude between ε = 10⁻³ and 10⁻¹).
With an ``accuracy_matrix`` in the stats (:mod:`adapters_store.evaluation`), a last panel shows it
as a heat map: one row per live version, one column per task (and the base's general answers),
so forgetting shows as a column that pales downwards.
The figure grows with the number of tasks and of modules, so labels never overlap.

Built on matplotlib's object API with the Agg canvas (no pyplot, no global state), so it is safe
to call from a server's worker threads.
"""

from __future__ import annotations

import io
import re
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_ANNOTATE_UP_TO = 12  # tasks; beyond that the numbers would be unreadable, colours remain
_LAYER = re.compile(r"layers\.(\d+)\.(?:.*\.)?([^.]+)$")


def short_module_name(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` → ``L3 q_proj``; otherwise the last two parts."""
    match = _LAYER.search(name)
    if match:
        return f"L{match[1]} {match[2]}"
    return ".".join(name.split(".")[-2:])


def render_stats_png(stats: dict[str, Any], dpi: int = 100) -> bytes:
    """A PNG of ``stats`` (the JSON view of :func:`adapters_store.stats.summary`)."""
    tasks: list[str] = stats.get("tasks", [])
    modules: dict[str, Any] = stats.get("modules", {})
    if not tasks:
        fig = Figure(figsize=(5, 2))
        fig.text(0.5, 0.5, "no live tasks", ha="center", va="center", fontsize=14)
        return _png(fig, dpi)

    subspace = stats.get("subspace")
    matrix = stats.get("accuracy_matrix") or []
    side = 2.5 + 0.45 * len(tasks)  # inches of heatmap per side
    height = max(side, 1.2 + 0.22 * len(modules), 4.0)
    widths = [side, 4.5, 4.0] + ([4.5] if subspace else []) + ([side + 0.5] if matrix else [])
    fig = Figure(figsize=(sum(widths) + 1.5, height), layout="constrained")
    cr_axes, bar_axes, eps_axes, *more_axes = fig.subplots(1, len(widths), width_ratios=widths)
    subspace_axes = more_axes[:1] if subspace else []
    if matrix:
        accuracy_heatmap(fig, more_axes[-1], matrix)
    eps = stats.get("params", {}).get("eps")
    _cr_heatmap(fig, cr_axes, stats["aggregate"], tasks, eps)
    b_shares = {n: (m["occupancy"] or 0.0, f"{m['b_positions_free']} left") for n, m in modules.items()}
    _occupancy_bars(
        bar_axes, b_shares, "share of B positions owned by some task", "occupancy of B per module"
    )
    acr_by_eps(eps_axes, stats["aggregate"], eps)
    if subspace:
        shares = {
            n: (m["occupancy"], f"{m['d_in'] - m['reserved']} of {m['d_in']} free")
            for n, m in subspace["modules"].items()
        }
        title = f"inflora: input directions reserved (ε = {subspace['energy']})"
        _occupancy_bars(subspace_axes[0], shares, "share of d_in reserved by the live tasks", title)
    return _png(fig, dpi)


def _cr_heatmap(fig: Figure, ax: Any, aggregate: dict[str, Any], tasks: list[str], eps: float | None) -> None:
    cr = [[0.0 if x is None else x for x in row] for row in aggregate["cr_dw"]]
    image = ax.imshow(cr, cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(tasks)), tasks, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    acr = aggregate.get("acr_dw")
    error = aggregate.get("cr_standard_error_max") or 0.0
    space = "ΔW" if eps is None else f"ΔW, ε = {eps:g}"
    title = f"collision rate CR ({space})" + (f"   ACR = {acr:.3g}" if acr is not None else "")
    ax.set_title(title + (f" ± {error:.1g}" if error else ""), fontsize=10)
    if len(tasks) <= _ANNOTATE_UP_TO:
        for i, row in enumerate(cr):
            for j, value in enumerate(row):
                colour = "black" if value > 0.6 else "white"
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of positions active in both")


def accuracy_heatmap(fig: Figure, ax: Any, matrix: list[dict[str, Any]]) -> None:
    """The accuracy matrix: row i is `continual` right after the i-th version went live, each
    cell a task's accuracy in % (blank before the task existed); the first column, when the base
    was scored, is the share of general prompts given the base's own answer."""
    from adapters_store.evaluation import matrix_table

    columns, table = matrix_table(matrix)
    cells = [[float("nan") if value is None else value for value in row] for row in table]
    image = ax.imshow(cells, cmap="RdYlGn", vmin=0.0, vmax=100.0, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(matrix)), [entry["after"] for entry in matrix], fontsize=8)
    ax.set_title("continual's accuracy (%) after each version", fontsize=10)
    if len(columns) <= _ANNOTATE_UP_TO:
        for i, row in enumerate(cells):
            for j, value in enumerate(row):
                if value == value:  # not NaN
                    ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, shrink=0.8, label="%")


_SPACES = (("acr_dw_by_eps", "ΔW", "#1f77b4"), ("acr_b_by_eps", "B", "#ff7f0e"))


def acr_by_eps(ax: Any, aggregate: dict[str, Any], primary: float | None = None) -> None:
    """ACR (eq. 10) against ε, one line per space (ΔW, B), from the ``acr_*_by_eps`` objects
    (keys are the ε as text); ``primary`` (the heatmap's ε) is marked by a dotted line. The x axis
    is logarithmic; symmetric-log when ε = 0 is a level, which a log axis cannot show."""
    levels = sorted({float(eps) for key, _, _ in _SPACES for eps in aggregate.get(key, {})})
    for key, label, colour in _SPACES:
        points = sorted((float(eps), acr) for eps, acr in aggregate.get(key, {}).items() if acr is not None)
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", color=colour, label=label)
    positive = [eps for eps in levels if eps > 0]
    if levels and levels[0] == 0:
        ax.set_xscale("symlog", linthresh=positive[0] if positive else 1e-3)
    else:
        ax.set_xscale("log")
    ax.set_xticks(levels, [f"{eps:g}" for eps in levels])
    ax.minorticks_off()
    ax.set_title("ACR against the threshold ε", fontsize=10)
    ax.set_xlabel("ε (active: |x| > ε · max |x|)")
    ax.set_ylabel("ACR (mean CR over pairs)")
    ax.set_box_aspect(0.8)
    if not ax.lines:  # fewer than two tasks: no pair
        ax.text(0.5, 0.5, "needs two tasks", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    ax.set_ylim(bottom=0.0)
    if primary is not None:
        ax.axvline(primary, color="grey", linestyle=":", linewidth=1, label=f"ε of the heatmap ({primary:g})")
    ax.legend(fontsize=8)


def _natural_key(name: str) -> list[Any]:
    """Layer 2 before layer 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _occupancy_bars(ax: Any, shares: dict[str, tuple[float, str]], xlabel: str, title: str) -> None:
    """One bar per module: the share used of what the module has, labelled with what is left."""
    names = sorted(shares, key=_natural_key)
    occupancy = [shares[n][0] for n in names]
    rows = range(len(names))
    ax.barh(rows, [1.0] * len(names), color="#e8e8e8")  # all the module has
    ax.barh(rows, occupancy, color="#d62728")
    ax.set_yticks(rows, [short_module_name(n) for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    for row, name in enumerate(names):
        share, left = shares[name]
        label = f"{share:.0%} · {left}"
        if share > 0.35:  # inside the bar, right-aligned
            ax.text(share - 0.01, row, label, va="center", ha="right", fontsize=7, color="white")
        else:
            ax.text(share + 0.01, row, label, va="center", ha="left", fontsize=7)


def _png(fig: Figure, dpi: int) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig)  # attaches the Agg canvas to the figure
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
