#!/usr/bin/env bash
# CogVLM end to end on a tiny random checkpoint in the hub's remote-code layout (no download): builds it
# (llava.model.cogvlm.tiny), then asks run_llava one question per compression spec.
# Usage: bash scripts/cogvlm/run_tiny.sh [OUT_DIR] [SPEC ...]     (default specs: none visionzip:64 vispruner:64 fastv:64)
# For the real model: python -m llava.eval.run_llava --model-path PATH/cogvlm-chat-hf --compression vispruner:123 ...
# (docs/cogvlm.md: the hub repository ships no tokenizer; copy Vicuna-7B-v1.5's into it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
OUT="${1:-$ROOT/.cache/cogvlm-tiny}"
shift || true
SPECS=("$@")
[ ${#SPECS[@]} -eq 0 ] && SPECS=(none visionzip:64 vispruner:64 fastv:64)
cd "$ROOT"
"$PYTHON" -c "import sys; from llava.model.cogvlm.tiny import build_tiny_cogvlm; print(build_tiny_cogvlm(sys.argv[1]))" "$OUT/model"
"$PYTHON" -c "import sys; import numpy as np; from PIL import Image; Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(sys.argv[1])" "$OUT/image.png"
for spec in "${SPECS[@]}"; do
    answer=$("$PYTHON" -m llava.eval.run_llava --model-path "$OUT/model" --image-file "$OUT/image.png" \
        --query "What is in the image?" --compression "$spec" --device cpu --temperature 0 --max_new_tokens 8 2>/dev/null)
    printf '%-14s %s\n' "$spec" "$answer"
done
