#!/usr/bin/env bash
# Issue 5's sustained-load figures: the embedded model served by `trimode serve`, driven by
# `trimode bench --endpoint` at 32 concurrent streaming clients for 60 s per mode and mixed, first
# with continuous batching (--max-batch 32), then serving one request at a time (--max-batch 1).
# Usage: scripts/serve_figures.sh [OUT_DIR] [DURATION_S]
set -euo pipefail
out=${1:-docs/bench/serve}
duration=${2:-60}
bin=$(dirname "$0")/../.venv/bin
port=8765
for batch in 32 1; do
    "$bin/trimode" serve --port $port --max-batch $batch &
    server=$!
    trap 'kill $server 2>/dev/null || true' EXIT
    until curl -sf http://127.0.0.1:$port/health >/dev/null; do sleep 0.5; done
    "$bin/trimode" bench --endpoint http://127.0.0.1:$port/v1 --modes ar,diffusion,selfspec,mixed \
        --concurrency 32 --duration "$duration" --out "$out/max-batch-$batch"
    kill $server
    wait $server || true
done
