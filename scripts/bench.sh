#!/usr/bin/env bash
# Where the time and memory of a LLaVA request go, per visual-token compression method and budget
# (docs/efficiency.md). Arguments go to `python -m llava.bench`; without any, the CPU measurement of the
# docs: LLaVA-1.5-7B geometry (random weights), 2 LLM layers, batch 1, outputs under outputs/llava-bench/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$ROOT"
if [ "$#" -eq 0 ]; then
    OUT="$ROOT/outputs/llava-bench"
    mkdir -p "$OUT"
    set -- --geometry llava-1.5-7b --layers 2 --batch 1 --repeats 3 --warmup 1 \
        --json "$OUT/llava-1.5-7b.json" --plot "$OUT/llava-1.5-7b.png" --markdown "$OUT/llava-1.5-7b.md"
fi
exec "$VENV/bin/python" -m llava.bench "$@"
