"""What inflora's subspace pass costs against the task's training, on a real base model.

    python bench/train/subspace.py                                        # the embedded model
    python bench/train/subspace.py --model /tmp/lamina-real/models/smollm2-135m-instruct

Trains a store's first and second ``inflora`` task (``codes``, then ``twice``: the shapes of
``bench/defaults``, auto hyper-parameters, as a user who sets nothing posts them) through
``trainer.publish.train_for_store`` and ``publish_trained`` on a fresh store: exactly what the
worker runs. The first task pays the base-model seed (``subspace_base_seconds``) before training;
every task pays the pass that grows the subspace after it (``subspace_seconds``). Wall seconds
come from the job's own metrics; CPU seconds of each phase are measured here by wrapping the
three functions ``train_for_store`` calls, since wall time on a shared machine includes waiting
for a core. Goal (issue 15): the pass ≤ 10 % of the task's training time.
Prints a table and writes ``bench/results/train-subspace-<model>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench" / "defaults"))

from adapters_store.fingerprint import fingerprint_model  # noqa: E402
from adapters_store.store import AdapterStore  # noqa: E402
from bench.report import RESULTS, envelope, markdown_table, write_result  # noqa: E402
from trainer import publish  # noqa: E402
from trainer.config import Hyperparameters, resolve_method  # noqa: E402
from trainer.loop import load_base  # noqa: E402

TASKS = ("codes", "twice")  # a store's first task (pays the seed) and a second one
GOAL = 0.10  # the pass's share of a task's training time


def cpu_timed(phases: dict[str, float], phase: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function``, adding the process CPU seconds of each call to ``phases[phase]``."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.process_time()
        try:
            return function(*args, **kwargs)
        finally:
            phases[phase] = phases.get(phase, 0.0) + time.process_time() - started

    return wrapper


def run(model_dir: Path, seed: int) -> list[dict[str, Any]]:
    from run import SHAPES  # bench/defaults/run.py: the task shapes users post

    model, tokenizer = load_base(model_dir)
    store = AdapterStore(Path(tempfile.mkdtemp(prefix="subspace-bench-")), fingerprint_model(model_dir))
    method = resolve_method("inflora")
    rows = []
    try:
        for shape in TASKS:
            examples, _ = SHAPES[shape](random.Random(f"{shape}:{seed}"))
            hp = Hyperparameters(seed=seed)
            phases: dict[str, float] = {}
            originals = {
                name: getattr(publish, name) for name in ("base_subspace", "train_task", "grow_subspace")
            }
            for name, function in originals.items():
                setattr(publish, name, cpu_timed(phases, name, function))
            try:
                trained = publish.train_for_store(model, tokenizer, store, examples, method, hp)
            finally:
                for name, function in originals.items():
                    setattr(publish, name, function)
            publish.publish_trained(store, shape, examples, method, hp, trained)
            m = trained.result.metrics
            train_s = float(m["seconds"])  # training proper: the loop, A's orientation included
            pass_s, seed_s = float(m["subspace_seconds"]), float(m.get("subspace_base_seconds", 0.0))
            rows.append(
                {
                    "task": shape,
                    "examples": len(examples),
                    "steps": m["steps"],
                    "completion_tokens": m["completion_tokens"],
                    "train_s": train_s,
                    "subspace_s": pass_s,
                    "seed_s": seed_s,
                    "train_cpu_s": round(phases["train_task"], 2),
                    "subspace_cpu_s": round(phases["grow_subspace"], 2),
                    "seed_cpu_s": round(phases.get("base_subspace", 0.0), 2),
                    "pass_share": pass_s / train_s,
                    "pass_share_cpu": phases["grow_subspace"] / phases["train_task"],
                    "with_seed_share": (pass_s + seed_s) / train_s,
                    "reserved_max": m.get("subspace_reserved_max"),
                }
            )
            print(f"{shape}: {rows[-1]}", flush=True)
    finally:
        shutil.rmtree(store.root, ignore_errors=True)
    return rows


HEADERS = [
    "task",
    "steps",
    "training s (CPU s)",
    "subspace pass s (CPU s)",
    "pass / training (CPU)",
    "base seed s (CPU s)",
    "pass + seed / training",
    "reserved, fullest module",
]


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    load = f"{m['load_average_at_start'][0]:.2f} at start, {m['load_average_at_end'][0]:.2f} at end"
    rows = [
        [
            r["task"],
            r["steps"],
            f"{r['train_s']:.1f} ({r['train_cpu_s']:.1f})",
            f"{r['subspace_s']:.2f} ({r['subspace_cpu_s']:.2f})",
            f"{100 * r['pass_share']:.1f} % ({100 * r['pass_share_cpu']:.1f} %)",
            f"{r['seed_s']:.1f} ({r['seed_cpu_s']:.1f})" if r["seed_s"] else "-",
            f"{100 * r['with_seed_share']:.1f} %",
            r["reserved_max"],
        ]
        for r in result["rows"]
    ]
    return "\n".join(
        [
            f"# inflora's subspace pass against training (bench/train/subspace.py): {result['model']}",
            "",
            f"Machine: {m['cpu_model']}, {m['cores']} cores, torch {m['torch']} on {result['config']['threads']} "
            f"thread(s); 1-min load average {load}. Commit {result['commit']['sha'][:12]}"
            f"{' (dirty)' if result['commit']['dirty'] else ''}, {result['date']}.",
            "",
            "A fresh store, `inflora` with auto hyper-parameters, tasks trained and published in order "
            "through `train_for_store`. Wall seconds from the job metrics, CPU seconds of the same phases "
            f"in brackets. Goal: the pass ≤ {100 * GOAL:.0f} % of the task's training time.",
            "",
            markdown_table(HEADERS, rows),
            "",
        ]
    )


def main() -> None:
    from trainer.contract.settings import LaminaSettings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=LaminaSettings().model, help="base model directory")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = envelope(
        "train-subspace", {"model": str(args.model), "threads": args.threads, "seed": args.seed}
    )
    result["model"] = args.model.name
    result["rows"] = run(args.model, args.seed)
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    report = render(result)
    print(report)
    write_result(result, RESULTS / f"train-subspace-{args.model.name}.json", report)


if __name__ == "__main__":
    main()
