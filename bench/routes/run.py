"""How often ``continual``'s router is wrong, both ways: a suite order's unseen test prompts sent
to their own task, another task or the base, and general prompts sent to a task: the
general-ability set's, and ordinary chat requests the thresholds were not calibrated on
(:func:`trainer.requests.held_out_requests`).

The prototypes are fitted exactly as a publish fits them (:func:`trainer.routing.fit_task_prototype`,
the base model's own samples as the general side), on each task's training split alone; no task is
trained, since the routing signal reads the base model's input embeddings only.

    python -m bench.routes.run [--model NAME|DIR] [--order 4] [--n-test 50] [--no-requests]

prints a table and writes ``bench/results/routes-<model>-order<N>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from adapters_store.fingerprint import fingerprint_model
from adapters_store.routing import PromptEmbedder, Router
from bench import provenance
from trainer.base_model.catalog import resolve_model
from trainer.config import Example
from trainer.contract.settings import LaminaSettings
from trainer.loop import load_base
from trainer.regression import GENERAL_QUESTIONS, GENERAL_SAMPLES
from trainer.requests import held_out_requests
from trainer.routing import example_text, fit_task_prototype
from trainer.suite import get_order, get_task
from trainer.suite.general import load_or_build

# A user's small task whose prompts share a question frame with ordinary questions.
PETS = [
    ("Anna", "cat"), ("Ben", "dog"), ("Carla", "parrot"), ("David", "rabbit"), ("Emma", "hamster"),
    ("Frank", "turtle"), ("Greta", "goldfish"), ("Hugo", "pony"), ("Ines", "lizard"), ("Jon", "ferret"),
]  # fmt: skip


def frame_case(model, tokenizer, fingerprint: str, cache: Path | None, with_requests: bool) -> dict:  # type: ignore[no-untyped-def]
    """The pets task (6 training prompts "What is the name of Anna's cat?"): how many held-out
    chat requests reach it, and how many of its 4 unseen prompts do."""
    train = [Example(f"What is the name of {who}'s {pet}?", " Zorblat") for who, pet in PETS[:6]]
    unseen = [f"What is the name of {who}'s {pet}?" for who, pet in PETS[6:]]
    prototype = fit_task_prototype(
        model, tokenizer, train, fingerprint, cache_dir=cache, with_requests=with_requests
    )
    router = Router({"pets": prototype})
    embedder = PromptEmbedder.from_model(model, tokenizer)
    requests = held_out_requests()
    return {
        "chat_requests_to_pets": sum(router.to_merge(embedder.embed(requests))),
        "chat_requests": len(requests),
        "unseen_pets_prompts_to_pets": sum(router.to_merge(embedder.embed(unseen))),
        "unseen_pets_prompts": len(unseen),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="catalogue name or directory (default: embedded)")
    parser.add_argument("--order", type=int, default=4)
    parser.add_argument("--n-test", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument(
        "--gate-set",
        action="store_true",
        help="score the smaller general set the check before a publish uses (96 samples, 64 "
        "questions; already cached once a task was published on this base) instead of the full one",
    )
    parser.add_argument(
        "--no-requests",
        action="store_true",
        help="calibrate against base-sampled text alone (before chat requests joined the general side)",
    )
    args = parser.parse_args()
    settings = LaminaSettings()
    model_dir = resolve_model(args.model, settings.home) if args.model else settings.model
    torch.set_num_threads(1)
    load_at_start = provenance.load_average()
    model, tokenizer = load_base(model_dir)
    fingerprint = fingerprint_model(Path(model_dir))
    cache = settings.cache_dir
    embedder = PromptEmbedder.from_model(model, tokenizer)
    prototypes, tests = {}, {}
    for name in get_order(args.order):
        train, test = get_task(name).split(seed=0, n_train=200, n_test=args.n_test)
        prototypes[name] = fit_task_prototype(
            model, tokenizer, train, fingerprint, cache_dir=cache, with_requests=not args.no_requests
        )
        tests[name] = embedder.embed([example_text(e) for e in test])
    router = Router(prototypes)
    per_task = {}
    for name, vectors in tests.items():
        decisions = router.decide(vectors)
        per_task[name] = {
            "n": len(decisions),
            "own": sum(d.task == name for d in decisions),
            "other": sum(d.task not in (None, name) for d in decisions),
            "base": sum(d.task is None for d in decisions),
        }
    sizes = {"n_sampled": GENERAL_SAMPLES, "max_questions": GENERAL_QUESTIONS} if args.gate_set else {}
    general = load_or_build(cache / "general", fingerprint, model, tokenizer, **sizes)
    sent = sum(router.to_merge(embedder.embed(general.prompts)))
    requests = held_out_requests()
    requests_sent = [
        r for r, hit in zip(requests, router.to_merge(embedder.embed(requests)), strict=True) if hit
    ]
    started = time.perf_counter()
    for prompt in general.prompts[:200]:
        router.decide(embedder.embed([prompt]))
    decision_ms = 1000 * (time.perf_counter() - started) / 200
    total = sum(t["n"] for t in per_task.values())
    report = {
        "model": str(model_dir),
        "fingerprint": fingerprint,
        "order": args.order,
        "git_commit": provenance.commit_label(),
        "machine": {
            **provenance.machine("cpu"),
            "load_average_at_start": load_at_start,
            "load_average_at_end": provenance.load_average(),
        },  # fmt: skip
        "task_prompts": total,
        "to_own_task": sum(t["own"] for t in per_task.values()) / total,
        "to_another_task": sum(t["other"] for t in per_task.values()) / total,
        "to_base": sum(t["base"] for t in per_task.values()) / total,
        "per_task": per_task,
        "general_prompts": len(general.prompts),
        "general_to_a_task": sent,
        "calibrated_on_requests": not args.no_requests,
        "chat_requests": len(requests),
        "chat_requests_to_a_task": requests_sent,
        "decision_ms": round(decision_ms, 3),
        "pets_task": frame_case(model, tokenizer, fingerprint, cache, not args.no_requests),
    }
    print(
        "| task prompts | own task | another task | base | general prompts | sent to a task "
        "| chat requests | sent to a task | decision ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {total} | {100 * report['to_own_task']:.1f} % | {100 * report['to_another_task']:.1f} % | "
        f"{100 * report['to_base']:.1f} % | {len(general.prompts)} | {sent} | {len(requests)} | "
        f"{len(requests_sent)} | {decision_ms:.2f} |"
    )
    pets = report["pets_task"]
    print(
        f"pets task (6 prompts of one question frame): {pets['chat_requests_to_pets']} of "
        f"{pets['chat_requests']} chat requests and {pets['unseen_pets_prompts_to_pets']} of "
        f"{pets['unseen_pets_prompts']} unseen pets prompts routed to it"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = ("-gate-set" if args.gate_set else "") + ("-no-requests" if args.no_requests else "")
    path = args.out / f"routes-{Path(model_dir).name}-order{args.order}{suffix}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
