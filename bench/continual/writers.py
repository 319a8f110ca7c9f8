"""The continual benchmark's writers: a markdown report, a JSON document and a PNG per run.

The JSON holds everything needed to redraw the others (:func:`load_result`): provenance
(:mod:`bench.provenance`'s machine header, the commit, the date, the base model's fingerprint),
the configuration, every matrix and the summary.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.continual.config import LORA_ALPHA, RANK, UPPER_BOUND, BenchmarkConfig
from bench.continual.results import BenchmarkResult, MethodRun
from trainer.suite.metrics import seen_task_accuracy

_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*")  # overlapping curves stay tellable


def result_to_dict(result: BenchmarkResult) -> dict[str, Any]:
    """The JSON document: provenance, configuration, per-task settings, every matrix, the summary."""
    config = asdict(result.config)
    config["model_dir"] = str(result.config.model_dir)
    config["work_dir"] = None if result.config.work_dir is None else str(result.config.work_dir)
    config["cache"] = None if result.config.cache is None else str(result.config.cache)
    return {
        "benchmark": "continual",
        "started_at": result.started_at,
        "wall_seconds": result.wall_seconds,
        "git_commit": result.git_commit,
        "base_model": {"path": str(result.config.model_dir), "fingerprint": result.base_fingerprint},
        "machine": result.machine,
        "config": config,
        "task_training": {
            t: {
                **(asdict(result.config.task_training(t)) if result.config.training == "table" else {}),
                "training": result.config.training,
                "r": RANK,
                "lora_alpha": LORA_ALPHA,
            }
            for t in result.tasks
        },
        "tasks": result.tasks,
        "test_sizes": result.test_sizes,
        "zero_shot": result.zero_shot,
        "probe_size": result.probe_size,
        "general_size": result.general_size,
        "upper_bound": {str(seed): scores for seed, scores in result.upper_bound.items()},
        "summary": result.summary(),
        "runs": [asdict(run) for run in result.runs],
        "matrix_convention": "accuracy[i][j]: test accuracy on task j after training task i (0-based); "
        "entries j = i + 1 are the next task before it is trained (for FWT0); null: not measured",
    }


def write_json(result: BenchmarkResult, path: Path) -> Path:
    path.write_text(json.dumps(result_to_dict(result), indent=2, allow_nan=False) + "\n")
    return path


def load_result(path: Path) -> BenchmarkResult:
    """Read a result back from its JSON, e.g. to redraw the table or the PNG without retraining
    (the summary is recomputed from the runs; the JSON's copy is only for readers)."""
    document = json.loads(path.read_text())
    config = dict(document["config"])
    config["methods"], config["seeds"] = tuple(config["methods"]), tuple(config["seeds"])
    config["model_dir"] = Path(config["model_dir"])
    config["work_dir"] = None if config["work_dir"] is None else Path(config["work_dir"])
    if config.get("cache") is not None:
        config["cache"] = Path(config["cache"])
    config["overrides"] = tuple(tuple(pair) for pair in config.get("overrides", ()))
    return BenchmarkResult(
        config=BenchmarkConfig(**config),
        tasks=document["tasks"],
        test_sizes=document["test_sizes"],
        zero_shot=document["zero_shot"],
        upper_bound={int(seed): scores for seed, scores in document["upper_bound"].items()},
        runs=[MethodRun(**run) for run in document["runs"]],
        machine=document["machine"],
        started_at=document["started_at"],
        wall_seconds=document["wall_seconds"],
        git_commit=document["git_commit"],
        base_fingerprint=document["base_model"]["fingerprint"],
        probe_size=document.get("probe_size", 0),
        general_size=document.get("general_size", {}),
    )


def _general_note(result: BenchmarkResult) -> str:
    size = result.general_size
    if not size:
        return "not measured"
    return f"{size['prompts']} prompts, {size['questions']} of them known-answer questions"


def _fmt(value: float | None, percent: bool = True, std: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = f"{100 * value:.1f}" if percent else f"{value:.3f}"
    if std is not None:
        text += f" ± {100 * std:.1f}" if percent else f" ± {std:.3f}"
    return text


def markdown_table(result: BenchmarkResult) -> str:
    """The summary table: one row per method (mean over seeds), then the per-task references."""
    summary = result.summary()
    lines = [
        "| method | AA ↑ | BWT ↑ | FWT ↑ | FWT0 ↑ | FR ↓ | GA ↑ | agree ↑ | KL ↓ | known ↑ "
        "| ACR | occupancy | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method in result.config.methods:
        row = summary[method]
        seconds = statistics.fmean(r.train_seconds for r in result.runs_of(method))
        cells = [
            _fmt(row[m], std=row[f"{m}_std"]) for m in ("AA", "BWT", "FWT", "FWT0", "FR", "GA", "GA_agree")
        ]
        cells.append(_fmt(row["GA_kl"], percent=False, std=row["GA_kl_std"]))
        cells.append(_fmt(row["GA_known"], std=row["GA_known_std"]))
        cells += [_fmt(row[m], percent=False, std=row[f"{m}_std"]) for m in ("ACR", "occupancy")]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    upper = result.upper_bound_mean()
    rest = " | –" * (lines[1].count("|") - 3)  # every column after AA
    if upper is not None:
        lines.append(f"| {UPPER_BOUND} (upper bound) | {_fmt(statistics.fmean(upper))}{rest} |")
    lines.append(f"| zero-shot (base) | {_fmt(statistics.fmean(result.zero_shot))}{rest} |")
    return "\n".join(lines)


def final_accuracy_table(result: BenchmarkResult) -> str:
    """Accuracy on each task after the last one (the matrix's last row), per method."""
    header = "| method | " + " | ".join(result.tasks) + " |"
    lines = [header, "|---|" + "---:|" * len(result.tasks)]
    for method in result.config.methods:
        last = result.mean_matrix(method)[-1]
        lines.append(f"| {method} | " + " | ".join(_fmt(v) for v in last) + " |")
    upper = result.upper_bound_mean()
    if upper is not None:
        lines.append(f"| {UPPER_BOUND} | " + " | ".join(_fmt(v) for v in upper) + " |")
    lines.append("| zero-shot | " + " | ".join(_fmt(v) for v in result.zero_shot) + " |")
    return "\n".join(lines)


def matrix_table(result: BenchmarkResult, method: str) -> str:
    """One method's mean matrix: a row per stage (after training task i), a column per task."""
    lines = ["| after \\ on | " + " | ".join(result.tasks) + " |", "|---|" + "---:|" * len(result.tasks)]
    for i, row in enumerate(result.mean_matrix(method)):
        cells = [("" if j > i + 1 else _fmt(v)) for j, v in enumerate(row)]
        cells = [f"({c})" if j == i + 1 and c not in ("", "–") else c for j, c in enumerate(cells)]
        lines.append(f"| {result.tasks[i]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(result: BenchmarkResult) -> str:
    """The whole markdown file: setting, summary table, final accuracies, every matrix."""
    config, machine = result.config, result.machine
    seeds = ", ".join(str(s) for s in config.seeds)
    parts = [
        f"# Continual benchmark: order {config.order} ({config.preset})",
        "",
        f"Tasks in order: {', '.join(result.tasks)}; test examples per task: "
        f"{', '.join(map(str, result.test_sizes))}; seeds: {seeds}. "
        f"Machine: {machine.get('cpu_model', machine.get('cpu'))}, {machine['cores']} cores, torch threads {machine['torch_threads']}, "
        f"device {machine['device']}{' (' + machine['gpu'] + ')' if 'gpu' in machine else ''}. "
        f"Wall time {result.wall_seconds / 60:.1f} min{_load_note(machine)}. "
        f"Commit {result.git_commit}; base model fingerprint "
        f"{result.base_fingerprint}. Started {result.started_at}.",
        "",
        'Accuracies in %, exact match, greedy decoding of `model="continual"` as the server routes each '
        f"prompt (routing: {config.routing}). "
        "AA: mean final accuracy (N-LoRA eq. 5). BWT: mean a_final − a_just-learned (PS-LoRA A.2). "
        "FWT: mean a_just-learned − a_trained-alone, tasks 2..T (PS-LoRA A.2 as its Table 2 computes it). "
        "FWT0: mean a_before-training − a_zero-shot, tasks 2..T (A.2's literal a_{i,i−1}; GEM's FWT). "
        "FR: mean drop from the best to the final accuracy (N-LoRA eq. 6). "
        f"GA: share of the general-ability probe ({result.probe_size} questions the base model answers; "
        "trainer/suite/probe.py) that `continual` still answers after the last task. "
        f"agree, KL, known: the general-ability set ({_general_note(result)}; trainer/suite/general.py) "
        "after the last task: share of prompts whose first 32 greedy tokens equal the base's, mean "
        "per-token KL(base ‖ continual) in nats on the base's sampled continuations, and accuracy on "
        "known-answer questions the base answers (100 % for the base); 95 % intervals in the JSON. "
        f"`continual` is routed by input (routing: {config.routing}): each prompt is scored on the "
        "model the server sends it to (the merge, a task's model, or the base itself). "
        "ACR (N-LoRA eq. 10) and occupancy (share of B positions owned) from `adapters_store.stats` "
        "on the live task adapters after the last task; – where not available. "
        "With several seeds: mean ± sample standard deviation over seeds.",
        "",
        markdown_table(result),
        "",
        "## Final accuracy per task",
        "",
        final_accuracy_table(result),
        "",
        "## Accuracy matrices",
        "",
        "Row: after training that task; column: the task scored. In parentheses: the next task, "
        "before it is trained.",
    ]
    for method in config.methods:
        parts += ["", f"### {method}", "", matrix_table(result, method)]
        reserved = [run.subspace_reserved for run in result.runs_of(method) if run.subspace_reserved]
        if reserved:  # inflora's capacity: the fullest module's reserved share of its inputs
            means = [statistics.fmean(values) for values in zip(*reserved, strict=False)]
            shares = ", ".join(f"{100 * share:.0f} %" for share in means)
            parts += ["", f"Input directions reserved in the fullest module after each task: {shares}."]
        for run in result.runs_of(method):
            if run.refused:
                names = ", ".join(result.tasks[i] for i in run.refused)
                parts += [
                    "",
                    f"Seed {run.seed}: no capacity left for {names} (refused, as the service would).",
                ]
    return "\n".join(parts) + "\n"


def _load_note(machine: dict[str, Any]) -> str:
    """The 1-minute load at start and end (results written before bench.provenance kept it as
    ``load_average_1min``: {start, end})."""
    old = machine.get("load_average_1min") or {}
    start, end = machine.get("load_average_at_start"), machine.get("load_average_at_end")
    start, end = (start[0] if start else old.get("start")), (end[0] if end else old.get("end"))
    if start is None:
        return ""
    return f" (1-min load average {start} at start, {end} at end)"


def write_markdown(result: BenchmarkResult, path: Path) -> Path:
    path.write_text(markdown_report(result))
    return path


def write_png(result: BenchmarkResult, path: Path) -> Path:
    """Two panels: (a) mean accuracy over the tasks seen so far after each task, per method,
    with the upper bound dashed (PS-LoRA Fig. 7's curves); (b) the first task's accuracy after
    each task — forgetting made visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(range(1, len(result.tasks) + 1))
    labels = [f"{i}\n{name}" for i, name in zip(stages, result.tasks, strict=True)]
    figure, (seen_axis, first_axis) = plt.subplots(1, 2, figsize=(12, 4.6), constrained_layout=True)
    for index, method in enumerate(result.config.methods):
        matrix = result.mean_matrix(method)
        style = {"marker": _MARKERS[index % len(_MARKERS)], "label": method, "alpha": 0.85}
        seen_axis.plot(stages, [100 * v for v in seen_task_accuracy(matrix)], **style)
        first_axis.plot(stages, [100 * (row[0] or 0.0) for row in matrix], **style)
    upper = result.upper_bound_mean()
    if upper is not None:
        running = [100 * statistics.fmean(upper[: i + 1]) for i in range(len(upper))]
        seen_axis.plot(stages, running, "k--", label=f"{UPPER_BOUND} (upper bound)")
        first_axis.axhline(100 * upper[0], color="k", linestyle="--")
    first_axis.axhline(100 * result.zero_shot[0], color="gray", linestyle=":")
    seen_axis.set_title("(a) mean accuracy on the tasks seen so far")
    first_axis.set_title(f"(b) accuracy on the first task ({result.tasks[0]}); dotted: zero-shot")
    for axis in (seen_axis, first_axis):
        axis.set_xticks(stages, labels)
        axis.set_xlabel("after training task")
        axis.set_ylabel("accuracy (%)")
        axis.set_ylim(-3, 103)
        axis.grid(alpha=0.3)
    seen_axis.legend(fontsize=8, loc="lower left")
    figure.suptitle(f"Continual benchmark, order {result.config.order} ({result.config.preset})")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_all(result: BenchmarkResult, out_dir: Path) -> dict[str, Path]:
    """``continual-order<N>.{md,json,png}`` in ``out_dir``; returns the paths by suffix."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"continual-order{result.config.order}"
    return {
        "md": write_markdown(result, stem.with_suffix(".md")),
        "json": write_json(result, stem.with_suffix(".json")),
        "png": write_png(result, stem.with_suffix(".png")),
    }
