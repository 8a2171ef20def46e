#!/usr/bin/env bash
# Qwen-VL on a tiny random checkpoint in the hub's layout (llava/model/qwen_vl, docs/qwen_vl.md): build it,
# then ask run_llava one question with no compression, VisPruner over the resampler's queries (64 of 256),
# VisionZip's analogue and FastV inside the LLM. Random weights: the answers are gibberish; the paths are real.
# Usage: bash scripts/qwen_vl/demo.sh [WORK_DIR]   (default: a new temporary folder; PYTHON overrides the interpreter)
set -euo pipefail
PYTHON=${PYTHON:-python}
WORK=${1:-$(mktemp -d)}
CKPT=$WORK/qwen-vl-chat-tiny
IMAGE=$WORK/image.png
[ -d "$CKPT" ] || "$PYTHON" -m llava.model.qwen_vl.tiny "$CKPT"
[ -f "$IMAGE" ] || "$PYTHON" -c "
from PIL import Image, ImageDraw
image = Image.new('RGB', (448, 336), (230, 230, 230))
ImageDraw.Draw(image).rectangle((40, 40, 200, 160), fill=(200, 30, 30))
image.save('$IMAGE')"
for spec in none vispruner:64 visionzip:64 fastv:64; do
    echo "--compression $spec:"
    "$PYTHON" -m llava.eval.run_llava --model-path "$CKPT" --image-file "$IMAGE" --query "What is in the picture?" \
        --device cpu --temperature 0 --max_new_tokens 8 --compression "$spec"
done
