"""Serving cost of Lamina's models against the base model, under many concurrent streaming clients.

    .venv/bin/python bench/serve/run.py                    # CPU defaults, ~10 min on 2 cores
    .venv/bin/python bench/serve/run.py --requests 16 --rounds 1 --ranks 8 --skip-hf   # a quick look

Every configuration is a real ``python -m server serve`` subprocess on a store filled with
synthetic adapters (``bench/serving_common.py``; no training needed), measured with the same
closed-loop streaming client (``bench/serve/client.py``):

- ``base``: no adapter;
- ``continual`` served as a concat LoRA (LoRI-D store) of total rank 8, 32, 64, 128 — each on a
  server whose ``max_lora_rank`` is the smallest vLLM slot that holds it, as an operator would
  configure it;
- the dense magnitude merge (PS-LoRA store) written into the weights
  (``LAMINA_CONTINUAL_SERVING=weights``): ``continual`` rounds make the merge live (publish,
  later rollback) so the server writes W0 + ΔW; ``base`` rounds remove the tasks so it writes W0
  back (while a merge is live, ``base`` is a correction adapter: bench/serve/weights.py measures
  that, and every merge kind in the weights);
- a mix of 8 task adapters: adjacent requests name different tasks, so batches mix adapters;
- the baseline a user would write by hand: transformers ``generate`` + PEFT, one request at a
  time (``bench/serve/hf_server.py``), for base, a rank-8 task adapter and the rank-64 concat.

Each Lamina row's ratios are to the ``base`` measured on the same server process in the same
rounds (scenarios are interleaved round by round, so load from other work on a shared machine
hits them alike); the HF rows' ratios are to the mean of all Lamina base measurements. Also
drives one server with ``vllm bench serve --backend openai`` as an independent client (for
``base`` and ``continual``) and records its output. Prints a table and writes
``bench/results/serve.{json,md}``. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import serving_common as common  # noqa: E402
from bench.report import RESULTS, envelope, markdown_table, report_head, write_result  # noqa: E402
from bench.serve.client import LoadRun, request_bodies, run_load, summarize  # noqa: E402
from bench.serve.vllm_bench import run_vllm_bench, vllm_payload  # noqa: E402
from server.processes import (  # noqa: E402
    ManagedProcess,
    free_port,
    lamina_env,
    running,
    spawn,
    start_server,
    wait_ready,
)

HERE = Path(__file__).resolve().parent


@dataclass
class Scenario:
    """One row of the table: which ``model`` values the clients send, on which server.

    ``before`` runs before every measurement of the scenario (warm-up and each round) and puts
    the server in the state the scenario needs — e.g. the dense merge written into the weights,
    or taken out again for ``base`` — so that even such scenarios are interleaved round by round;
    what it returns (how long the switch took) is kept in ``switches``."""

    name: str
    models: list[str]
    before: Callable[[ManagedProcess], dict[str, Any]] | None = None
    runs: list[LoadRun] = field(default_factory=list)
    load: list[float] = field(default_factory=list)  # 1-minute load average at each round's start
    switches: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ServerPlan:
    """One server process: how to start it and what to measure on it."""

    name: str
    scenarios: list[Scenario]
    start: Callable[[Path], ManagedProcess]
    config: dict[str, Any]
    after: Callable[[ManagedProcess], dict[str, Any]] | None = None  # e.g. vllm bench serve
    facts: dict[str, Any] = field(default_factory=dict)
    requests: int = 0  # per scenario per round; 0: --requests
    rounds: int = 0  # 0: --rounds
    warm_up: int = 0  # warm-up requests per scenario; 0: two per client


# --- building the plans --------------------------------------------------------------------------


def lamina_starter(name: str, home: Path, store: Path, settings: dict[str, Any]) -> Callable:
    def start(log_dir: Path) -> ManagedProcess:
        env = lamina_env(home, store, **settings)
        return start_server(env, log_dir / f"{name}.log", name=name, cwd=REPO)

    return start


def concat_plans(args: argparse.Namespace, work: Path, model_dir: Path) -> list[ServerPlan]:
    """One server per concat rank; the store with ``--mix-tasks`` tasks also runs the mix."""
    plans = []
    has_mix = False
    for rank in args.ranks:
        task_rank = min(args.task_rank, rank)
        tasks = -(-rank // task_rank)
        store = work / f"concat-r{rank}" / "store"
        publications = common.build_concat_store(store, model_dir, tasks, task_rank)
        served_rank = int(publications[-1].merge.meta["rank"])
        # served as a LoRA (the weights default is bench/serve/weights.py's subject)
        settings = {
            **args.settings,
            "max_lora_rank": common.lora_slot(served_rank),
            "continual_serving": "lora",
        }
        scenarios = [Scenario("base", ["base"]), Scenario(f"continual concat r{served_rank}", ["continual"])]
        if tasks == args.mix_tasks and not has_mix:
            has_mix = True
            names = [p.task.name for p in publications]
            scenarios.append(Scenario(f"mix of {tasks} task adapters (r{task_rank})", names))
        name = f"concat-r{rank}"
        config = {"store": f"lori-d, {tasks} tasks x r{task_rank}", "settings": settings}
        plan = ServerPlan(name, scenarios, lamina_starter(name, work / name, store, settings), config)
        plan.facts["store_path"] = str(store)
        plan.facts["continual_path"] = str(publications[-1].merge.path)
        plan.facts["first_task_path"] = str(publications[0].task.path)
        plan.facts["first_task_rank"] = task_rank
        plans.append(plan)
    if not has_mix:
        plans.append(mix_plan(args, work, model_dir))
    return plans


def mix_plan(args: argparse.Namespace, work: Path, model_dir: Path) -> ServerPlan:
    """A server just for the mix, when no concat rank had ``--mix-tasks`` tasks."""
    store = work / "mix" / "store"
    publications = common.build_concat_store(store, model_dir, args.mix_tasks, args.task_rank)
    settings = {
        **args.settings,
        "max_lora_rank": common.lora_slot(args.mix_tasks * args.task_rank),
        "continual_serving": "lora",
    }
    names = [p.task.name for p in publications]
    scenarios = [
        Scenario("base", ["base"]),
        Scenario(f"mix of {len(names)} task adapters (r{args.task_rank})", names),
    ]
    config = {"store": f"lori-d, {len(names)} tasks x r{args.task_rank}", "settings": settings}
    return ServerPlan("mix", scenarios, lamina_starter("mix", work / "mix", store, settings), config)


def weights_plan(args: argparse.Namespace, work: Path, model_dir: Path) -> ServerPlan:
    """PS-LoRA's dense merge written into the engine's weights, against base on the same server.

    The server starts on an empty store. ``continual`` rounds first publish the tasks (later:
    roll back to that merge), so the server writes W0 + ΔW; ``base`` rounds remove the tasks, so
    it writes W0 back and serves ``base`` again (it does not while a weights merge is live)."""
    store_root = work / "dense" / "store"
    store = common.open_store(store_root, model_dir)
    settings = {**args.settings, "continual_serving": "weights"}
    merged: dict[str, str] = {}

    def merge_live(server: ManagedProcess) -> dict[str, Any]:
        started = time.perf_counter()
        if not merged:
            publications = common.build_magnitude_store(
                store_root, model_dir, args.dense_tasks, args.task_rank, args.dense_targets, seed=100
            )
            merged["id"], how = publications[-1].merge.id, "publish"
        else:
            store.rollback(merged["id"])
            how = "rollback"
        written = time.perf_counter()
        wait_for_live(server.url, merged["id"])
        return {
            "to": merged["id"],
            "how": how,
            "store_s": written - started,
            "to_live_s": time.perf_counter() - written,
        }

    def base_live(server: ManagedProcess) -> dict[str, Any]:
        started = time.perf_counter()
        for task in reversed(store.tasks()):
            store.remove_task(task.name)
        written = time.perf_counter()
        wait_for_live(server.url, None)
        return {
            "to": "base",
            "how": "remove tasks",
            "store_s": written - started,
            "to_live_s": time.perf_counter() - written,
        }

    scenarios = [
        Scenario("base", ["base"], before=base_live),
        Scenario("continual magnitude merge in weights", ["continual"], before=merge_live),
    ]
    config = {
        "store": f"ps-lora, {args.dense_tasks} tasks x r{args.task_rank} on {','.join(args.dense_targets)}",
        "settings": settings,
    }
    return ServerPlan(
        "dense-weights",
        scenarios,
        lamina_starter("dense-weights", work / "dense", store_root, settings),
        config,
    )


def hf_plan(args: argparse.Namespace, model_dir: Path, concat: list[ServerPlan]) -> ServerPlan:
    """The hand-written transformers + PEFT server, with a task adapter and a concat merge."""
    adapters: dict[str, str] = {}
    scenarios = [Scenario("base", ["base"])]
    first = next((p for p in concat if "first_task_path" in p.facts), None)
    if first is not None:
        adapters["task"] = first.facts["first_task_path"]
        scenarios.append(Scenario(f"task adapter r{first.facts['first_task_rank']}", ["task"]))
    largest = next((p for p in concat if p.name == f"concat-r{args.hf_concat_rank}"), None)
    if largest is not None:
        adapters["continual"] = largest.facts["continual_path"]
        scenarios.append(Scenario(f"continual concat r{args.hf_concat_rank}", ["continual"]))

    def start(log_dir: Path) -> ManagedProcess:
        port = free_port()
        command = [sys.executable, str(HERE / "hf_server.py"), "--model", str(model_dir), "--port", str(port)]
        command += [f"--adapter={name}={path}" for name, path in adapters.items()]
        if args.hf_threads:
            command.append(f"--threads={args.hf_threads}")
        server = spawn("hf", command, {}, log_dir / "hf.log", url=f"http://127.0.0.1:{port}", cwd=REPO)
        server.started_s = wait_ready(server)
        return server

    config = {"server": "transformers generate + PEFT, one request at a time", "adapters": adapters}
    config["requests"], config["rounds"] = args.hf_requests, args.hf_rounds
    plan = ServerPlan("hf-peft", scenarios, start, config)
    plan.requests, plan.rounds, plan.warm_up = args.hf_requests, args.hf_rounds, args.concurrency
    return plan


def wait_for_live(url: str, merge_id: str | None, timeout_s: float = 300) -> None:
    """Until the server's /ready names ``merge_id`` as live (None: no merge, the base model)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ready = httpx.get(f"{url}/ready", timeout=5)
        except httpx.TimeoutException:  # a busy server answers late; the deadline still holds
            continue
        if ready.status_code == 200 and ready.json().get("live_merge") == merge_id:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{url} never served merge {merge_id}")


# --- vllm bench serve ------------------------------------------------------------------------------


def vllm_bench_step(args: argparse.Namespace, model_dir: Path, log_dir: Path) -> Callable:  # noqa: ARG001
    """``vllm bench serve`` (OpenAI backend, random dataset) against Lamina, for base and continual."""

    def step(server: ManagedProcess) -> dict[str, Any]:
        common = dict(
            tokenizer=model_dir,
            prompts=args.vllm_bench_prompts,
            concurrency=args.concurrency,
            input_len=args.vllm_bench_input_len,
            output_len=args.max_tokens,
        )
        out: dict[str, Any] = {}
        for model in ("base", "continual"):
            print(f"vllm bench serve, model={model} ...", flush=True)
            out[model] = run_vllm_bench(server.url, model, **common)
        answer = httpx.post(f"{server.url}/v1/completions", json=vllm_payload("base", "Hello", 8), timeout=30)
        out["payload_answer"] = {"status": answer.status_code, "body": answer.text[:600]}
        return out

    return step


# --- running -----------------------------------------------------------------------------------


def measure(server: ManagedProcess, plan: ServerPlan, args: argparse.Namespace) -> None:
    """A warm-up per scenario, then ``--rounds`` rounds, each measuring every scenario once."""
    requests, rounds = plan.requests or args.requests, plan.rounds or args.rounds
    warm_up = plan.warm_up or 2 * args.concurrency
    for scenario in plan.scenarios:  # first use loads adapters, warms caches and kernels
        prepare(server, scenario)
        asyncio.run(
            run_load(server.url, request_bodies(scenario.models, warm_up, args.max_tokens), args.concurrency)
        )
    for round_index in range(rounds):
        for scenario in plan.scenarios:
            prepare(server, scenario)
            scenario.load.append(os.getloadavg()[0])
            bodies = request_bodies(scenario.models, requests, args.max_tokens)
            run = asyncio.run(run_load(server.url, bodies, args.concurrency))
            scenario.runs.append(run)
            brief = summarize([run])
            print(
                f"  round {round_index + 1} {scenario.name}: {brief['tokens_per_s']:.1f} tok/s, "
                f"TPOT p50 {brief['tpot_ms']['p50']:.1f} ms, failed {brief['failed']}, load {scenario.load[-1]:.1f}",
                flush=True,
            )


def prepare(server: ManagedProcess, scenario: Scenario) -> None:
    if scenario.before is not None:
        scenario.switches.append(scenario.before(server))


def execute(plan: ServerPlan, args: argparse.Namespace, log_dir: Path) -> None:
    print(f"== {plan.name}: starting server ({plan.config}) ...", flush=True)
    server = plan.start(log_dir)
    plan.facts["start_s"] = server.started_s
    with running(server):
        measure(server, plan, args)
        if plan.after is not None:
            plan.facts["after"] = plan.after(server)


METRICS = {  # ratio name -> where the figure is in a summary
    "tokens_per_s": ("tokens_per_s", None),
    "ttft_p50": ("ttft_ms", "p50"),
    "tpot_p50": ("tpot_ms", "p50"),
}


def _figure(summary: dict[str, Any], metric: str) -> float | None:
    key, sub = METRICS[metric]
    return summary[key] if sub is None else summary[key][sub]


def record_plans(result: dict[str, Any], plans: list[ServerPlan], drop_facts: tuple[str, ...] = ()) -> None:
    """What a benchmark that ran server plans writes into its result: the load average at the
    end, each server (config, facts other than ``drop_facts``, the switch timings of the
    scenarios that switch) and each scenario's record (:func:`scenario_rows`)."""
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    result["servers"] = [
        {
            "name": p.name,
            "config": p.config,
            "facts": {k: v for k, v in p.facts.items() if k not in drop_facts},
            "switches": {sc.name: sc.switches for sc in p.scenarios if sc.switches},
        }
        for p in plans
    ]
    result["scenarios"] = scenario_rows(plans)


def scenario_rows(plans: list[ServerPlan]) -> list[dict[str, Any]]:
    """One record per scenario, with ratios to the right base (see the module docstring).

    Throughput drifts with the load other work puts on a shared machine, so a Lamina row's
    tokens/s ratio is the median over rounds of (its tokens/s / the same server's base in the same
    round). Latency ratios compare the p50s of all requests pooled over the rounds: one round in
    which the machine stalled and answers arrived in bursts cannot move them much, while it
    would dominate a per-round TPOT ratio."""
    records = []
    for plan in plans:
        for scenario in plan.scenarios:
            by_round = [summarize([run]) for run in scenario.runs]
            records.append(
                {
                    "server": plan.name,
                    "scenario": scenario.name,
                    "models": scenario.models,
                    **summarize(scenario.runs),
                    "by_round": {m: [_figure(r, m) for r in by_round] for m in METRICS},
                    "load_average_by_round": scenario.load,
                }
            )
    lamina_base = [r for r in records if r["scenario"] == "base" and r["server"] != "hf-peft"]
    for record in records:
        base = next((b for b in lamina_base if b["server"] == record["server"]), None)
        if base is not None:
            paired = [
                _ratio(value, reference)
                for value, reference in zip(
                    record["by_round"]["tokens_per_s"], base["by_round"]["tokens_per_s"], strict=False
                )
            ]
            paired = [x for x in paired if x is not None]
            record["ratio_to_base"] = {
                "against": "base on the same server; tokens/s: median of per-round ratios; latencies: pooled p50s",
                "tokens_per_s_by_round": paired,
            }
            for metric in METRICS:
                record["ratio_to_base"][metric] = _ratio(_figure(record, metric), _figure(base, metric))
            record["ratio_to_base"]["tokens_per_s_pooled"] = record["ratio_to_base"]["tokens_per_s"]
            record["ratio_to_base"]["tokens_per_s"] = statistics.median(paired) if paired else None
        else:
            record["ratio_to_base"] = {"against": "mean of the Lamina base rows"}
            for metric in METRICS:
                values = [_figure(b, metric) for b in lamina_base if _figure(b, metric) is not None]
                mean = statistics.mean(values) if values else None
                record["ratio_to_base"][metric] = _ratio(_figure(record, metric), mean)
    return records


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


# --- reporting ---------------------------------------------------------------------------------


def _pcts(figures: dict[str, float | None]) -> str:
    return " / ".join("-" if figures[k] is None else f"{figures[k]:.0f}" for k in ("p50", "p95", "p99"))


def table(records: list[dict[str, Any]]) -> str:
    headers = [
        "server", "model", "tok/s", "× base tok/s", "TTFT ms p50/95/99", "× base TTFT",
        "ITL ms p50/95/99", "TPOT ms p50", "× base TPOT", "tokens/req", "failed",
    ]  # fmt: skip
    rows = [
        [
            r["server"],
            r["scenario"],
            r["tokens_per_s"],
            r["ratio_to_base"]["tokens_per_s"],
            _pcts(r["ttft_ms"]),
            r["ratio_to_base"]["ttft_p50"],
            _pcts(r["itl_ms"]),
            r["tpot_ms"]["p50"],
            r["ratio_to_base"]["tpot_p50"],
            r["mean_output_tokens"],
            f"{r['failed']}/{r['requests']}",
        ]
        for r in records
    ]
    return markdown_table(headers, rows)


def vllm_table(vllm: dict[str, Any]) -> str:
    headers = [
        "run",
        "exit",
        "completed",
        "failed",
        "out tok/s",
        "TTFT ms p50/p99",
        "TPOT ms p50",
        "ITL ms p50/p99",
    ]
    rows = []
    for run, out in vllm.items():
        if not isinstance(out, dict) or "returncode" not in out:
            continue
        s = out["summary"] or {}
        rows.append([
            run, out["returncode"], s.get("completed"), s.get("failed"), s.get("output_throughput"),
            _pair(s, "median_ttft_ms", "p99_ttft_ms"), s.get("median_tpot_ms"), _pair(s, "median_itl_ms", "p99_itl_ms"),
        ])  # fmt: skip
    return markdown_table(headers, rows)


def _pair(summary: dict[str, Any], a: str, b: str) -> str:
    if summary.get(a) is None:
        return "-"
    return f"{summary[a]:.0f} / {summary[b]:.0f}"


def markdown(result: dict[str, Any]) -> str:
    c = result["config"]
    parts = [
        *report_head("bench/serve", result),
        f"{c['concurrency']} concurrent streaming clients, closed loop, {c['requests']} requests per "
        f"configuration per round x {c['rounds']} rounds, max_tokens {c['max_tokens']}, temperature 1 with a "
        "seed per request (the same requests for every configuration). A Lamina row's × base tok/s is the "
        "median over rounds of its tokens/s / base's on the same server in the same round, its latency "
        "ratios compare p50s pooled over the rounds; HF rows are divided by the "
        f"mean Lamina base (HF: {c['hf_requests']} requests x {c['hf_rounds']} round). Latencies are "
        "client-side; the client shares the machine with the servers.",
        "",
        table(result["scenarios"]),
        "",
        "Servers: "
        + "; ".join(f"{s['name']} start {s['facts'].get('start_s', 0):.0f} s" for s in result["servers"]),
        "",
        "Reading figures from a shared CPU: the clients, the API process and the engine share the cores "
        "with any other work (the JSON has each round's figures and load average). When the API process "
        "falls behind it writes several events at once, so a fast row's ITL p50 can read 0 ms, and a "
        "stalled round delivers whole answers in bursts; tokens/s and the pooled TPOT p50 are the figures "
        "to compare. TTFT includes queueing: 8 clients on a server that runs one request at a time (HF) "
        "wait for each other.",
    ]
    if result.get("vllm_bench"):
        parts += ["", "## vllm bench serve (independent client)", "", vllm_table(result["vllm_bench"])]
        failed = {run: out for run, out in result["vllm_bench"].items() if out.get("returncode", 0) != 0}
        for run, out in failed.items():
            answer = result["vllm_bench"].get("payload_answer", {})
            parts += [
                "",
                f"The `{run}` run failed; Lamina answers vLLM's request body with {answer.get('status')} "
                f"`{answer.get('body')}`. Its output (tail):",
                "",
                "```",
                out.get("output_tail", ""),
                "```",
            ]
    return "\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent streaming clients")
    parser.add_argument("--requests", type=int, default=48, help="requests per configuration per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per server")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 64, 128], help="concat ranks")
    parser.add_argument("--task-rank", type=int, default=8, help="rank of each synthetic task")
    parser.add_argument("--mix-tasks", type=int, default=8, help="task adapters in the mixed batch")
    parser.add_argument("--dense-tasks", type=int, default=2, help="PS-LoRA tasks in the weights merge")
    parser.add_argument("--dense-targets", type=lambda s: s.split(","), default=["q_proj", "v_proj"])
    parser.add_argument(
        "--hf-concat-rank", type=int, default=64, help="concat rank also served by the HF baseline"
    )
    parser.add_argument(
        "--hf-requests", type=int, default=24, help="HF baseline: requests per scenario per round"
    )
    parser.add_argument(
        "--hf-rounds", type=int, default=1, help="HF baseline: rounds (it serves one at a time)"
    )
    parser.add_argument(
        "--hf-threads", type=int, default=0, help="torch threads of the HF baseline (0: default)"
    )
    parser.add_argument(
        "--vllm-bench-rank", type=int, default=64, help="run vllm bench on this concat server"
    )
    parser.add_argument("--vllm-bench-prompts", type=int, default=64)
    parser.add_argument("--vllm-bench-input-len", type=int, default=32)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-weights", action="store_true")
    parser.add_argument("--skip-vllm-bench", action="store_true")
    common.add_server_arguments(parser)
    parser.add_argument("--out", type=Path, default=RESULTS / "serve.json")
    args = common.parse_server_arguments(parser)
    result = run(args)
    print(table(result["scenarios"]))
    write_result(result, args.out, markdown(result))


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = {k: v for k, v in vars(args).items() if k not in ("out", "work")}
    result = envelope("serve", config)
    model_dir = common.base_model_dir()
    result["base_model"] = str(model_dir)
    with tempfile.TemporaryDirectory(prefix="lamina-serve-bench-") as tmp:
        work = args.work or Path(tmp)
        print(f"building synthetic stores in {work} ...", flush=True)
        plans = concat_plans(args, work, model_dir)
        if not args.skip_vllm_bench:
            target = next((p for p in plans if p.name == f"concat-r{args.vllm_bench_rank}"), plans[-1])
            target.after = vllm_bench_step(args, model_dir, work / "logs")
        if not args.skip_weights:
            plans.append(weights_plan(args, work, model_dir))
        if not args.skip_hf:
            plans.append(hf_plan(args, model_dir, plans))
        for plan in plans:
            execute(plan, args, work / "logs")
    record_plans(result, plans, drop_facts=("after",))  # vllm bench's "after": kept apart, below
    result["vllm_bench"] = next((p.facts["after"] for p in plans if "after" in p.facts), None)
    return result


if __name__ == "__main__":
    main()
