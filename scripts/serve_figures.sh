#!/usr/bin/env bash
# The README's serving figures: the embedded model served by `trimode serve`, driven by
# `trimode bench --endpoint` at 32 concurrent streaming clients, configurations interleaved in
# rounds (one slice of each per round), with bootstrap intervals over the slices.
#  1. continuous batching (--max-batch 32), then one request at a time (--max-batch 1):
#     ar, diffusion, selfspec and mixed, DURATION_S per configuration over ROUNDS rounds;
#  2. --max-num-batched-tokens 512, 256 and 128 (max batch 32): ar and mixed, the AR requests'
#     inter-token latency in a mixed server against an AR-only one.
# Usage: scripts/serve_figures.sh [OUT_DIR] [DURATION_S] [ROUNDS]
set -euo pipefail
out=${1:-docs/bench/serve}
duration=${2:-60}
rounds=${3:-6}
bin=$(dirname "$0")/../.venv/bin
port=8765

bench() {  # bench SERVE_FLAGS MODES OUT
    "$bin/trimode" serve --port $port $1 &
    server=$!
    trap 'kill $server 2>/dev/null || true' EXIT
    until curl -sf http://127.0.0.1:$port/health >/dev/null; do sleep 0.5; done
    "$bin/trimode" bench --endpoint http://127.0.0.1:$port/v1 --modes "$2" --concurrency 32 \
        --duration "$duration" --repeats "$rounds" --out "$3"
    kill $server
    wait $server || true
}

for batch in 32 1; do
    bench "--max-batch $batch" ar,diffusion,selfspec,mixed "$out/max-batch-$batch"
done
for budget in 512 256 128; do
    bench "--max-batch 32 --max-num-batched-tokens $budget" ar,mixed "$out/batched-tokens-$budget"
done
