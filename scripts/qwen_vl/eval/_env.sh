#!/usr/bin/env bash
# Sourced by scripts/qwen_vl/eval/<benchmark>.sh: Qwen-VL's defaults for the v1.5 pipeline (scripts/v1_5/eval/,
# whose environment variables all apply), then the v1.5 script of the same name runs.
#   MODEL_PATH  default Qwen/Qwen-VL: VisPruner's Table 4 "Qwen-VL-7B" (its vanilla row, 78.8 / 59.3 / 35.2 /
#               67.1 / 63.8, is the base Qwen-VL of the Qwen-VL paper); Qwen/Qwen-VL-Chat works too
#   CONV_MODE   default qwen_vqa ("<img>...</img>{question} Answer:", the base model's VQA prompt); qwen_chatml
#               for Qwen-VL-Chat (docs/qwen_vl.md)
#   BUDGET      visual tokens per image, of the resampler's 256 queries (the paper: 128); one view per image,
#               so the v1.5 budget family (the total is the per-image budget)
export MODEL_PATH=${MODEL_PATH:-Qwen/Qwen-VL}
export CONV_MODE=${CONV_MODE:-qwen_vqa}
export MODEL_FAMILY=qwen-vl
