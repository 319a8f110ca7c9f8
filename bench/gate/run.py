"""What the check before every publish costs (trainer/regression.py): a sequence of suite tasks
posted as a user would (default method, auto hyper-parameters, the worker's gate on), with each
job's training time beside the time its gate took. The general-ability set the gate scores the
base on is built once per base model (the first job) and cached: that one-off time is its own
column, and left out of the job's time the share is taken of.

    python -m bench.gate.run [--model NAME|DIR] [--order 1] [--n-tasks 4]

prints a table and writes ``bench/results/gate-<model>-order<N>.{json,md}``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from adapters_store.fingerprint import fingerprint_model
from adapters_store.store import AdapterStore
from bench import provenance
from bench.report import envelope, markdown_table, write_result
from server.settings import ServerSettings
from trainer.base_model.catalog import resolve_model
from trainer.config import Hyperparameters, resolve_method
from trainer.contract.settings import LaminaSettings
from trainer.loop import load_base
from trainer.publish import train_and_publish
from trainer.suite import get_order, get_task
from trainer.worker import gate_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="catalogue name or directory (default: embedded)")
    parser.add_argument("--order", type=int, default=1)
    parser.add_argument("--n-tasks", type=int, default=4)
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    settings = LaminaSettings()
    model_dir = resolve_model(args.model, settings.home) if args.model else settings.model
    torch.set_num_threads(1)
    result = envelope("gate", vars(args) | {"out": str(args.out), "model_dir": str(model_dir)})
    result["machine"] = {**provenance.machine("cpu"), "load_average_at_start": provenance.load_average()}
    model, tokenizer = load_base(model_dir)
    method = resolve_method(ServerSettings().fallback_method)  # what a POST /tasks naming none gets
    gate = gate_for(settings.model_copy(update={"forgetting_policy": "warn"}))  # measure it, never refuse
    rows = []
    with tempfile.TemporaryDirectory() as root:
        store = AdapterStore(
            Path(root) / "store", fingerprint_model(Path(model_dir)), base_model=str(model_dir)
        )
        for name in get_order(args.order)[: args.n_tasks]:
            train, _test = get_task(name).split(seed=0, n_train=args.n_train, n_test=1)
            started = time.perf_counter()
            trained, _ = train_and_publish(
                store, name, train, method, Hyperparameters(), lambda: (model, tokenizer),
                max_lora_rank=settings.max_lora_rank, cache_dir=settings.cache_dir, gate=gate,
            )  # fmt: skip
            metrics = trained.result.metrics
            built_s = float(metrics.get("general_set_seconds", 0.0))
            job_s = time.perf_counter() - started - built_s
            gate_s = float(metrics["regression_seconds"])
            rows.append({"task": name, "live_tasks": len(store.tasks()), "job_s": round(job_s, 2),
                         "gate_s": gate_s, "share": round(gate_s / job_s, 4), "general_set_s": built_s,
                         "general_agreement": metrics.get("general_agreement")})  # fmt: skip
            print(f"{name}: job {job_s:.1f} s, gate {gate_s:.1f} s, general set {built_s:.1f} s", flush=True)
    result["machine"]["load_average_at_end"] = provenance.load_average()
    result["rows"] = rows
    table = markdown_table(
        ["task", "live tasks after", "job s", "gate s", "gate / job", "general set s", "base's answers kept"],
        [
            [r["task"], r["live_tasks"], r["job_s"], r["gate_s"], f"{100 * r['share']:.1f} %",
             r["general_set_s"], f"{r['general_agreement']} %"]
            for r in rows
        ],
    )  # fmt: skip
    print(table)
    write_result(result, args.out / f"gate-{Path(model_dir).name}-order{args.order}.json", table)


if __name__ == "__main__":
    main()
