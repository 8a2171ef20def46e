#!/usr/bin/env bash
# Full fine-tuning with VisionZip on 8x 24 GB GPUs (RTX 3090 / 4090), as in the paper: per-device batch 4,
# gradient accumulation 4 (global batch 8 x 4 x 4 = 128, as LLaVA-1.5), ZeRO-3; everything else as
# finetune_visionzip.sh. Out of memory at 13B: ZERO=zero3_offload.
set -euo pipefail
MODEL_SIZE=${MODEL_SIZE:-7b}   # 7b or 13b
BUDGET=${BUDGET:-64}           # 64, 128 or 192
export MODEL_SIZE BUDGET
export NUM_GPUS=${NUM_GPUS:-8} PER_DEVICE_BATCH=4 GRAD_ACCUM=${GRAD_ACCUM:-4} ZERO=${ZERO:-zero3}
exec bash "$(dirname "${BASH_SOURCE[0]}")/finetune_visionzip.sh"
