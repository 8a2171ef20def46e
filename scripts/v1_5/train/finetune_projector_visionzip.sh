#!/usr/bin/env bash
# VisionZip‡ efficient tuning: start from a trained LLaVA-1.5, train only mm_projector on VisionZip's
# compressed visual tokens (everything else frozen), lr 2e-5, 1 epoch on 1/10 of llava_v1_5_mix665k.json,
# 8 GPUs (about 30 min on 8 A800 for 7B). Output: mm_projector.bin + config.json; evaluate with
#   --model-path $OUTPUT_DIR --model-base $LLAVA_CKPT
set -euo pipefail

MODEL_SIZE=${MODEL_SIZE:-7b}              # 7b or 13b
BUDGET=${BUDGET:-64}                      # visual tokens per image: 64 (54+10), 128 (108+20), 192 (162+30); COMPRESSION=SPEC overrides
NUM_GPUS=${NUM_GPUS:-8}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-16}  # 8 x 16 = global batch 128
GRAD_ACCUM=${GRAD_ACCUM:-1}
DATA_DIR=${DATA_DIR:-./playground/data}   # llava_v1_5_mix665k.json + coco/ gqa/ ocr_vqa/ textvqa/ vg/
SUBSET_SEED=${SUBSET_SEED:-0}
VISION_TOWER=${VISION_TOWER:-openai/clip-vit-large-patch14-336}
REPORT_TO=${REPORT_TO:-wandb}             # wandb (WANDB_MODE=offline works without network) or none

source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
select_model_size "$MODEL_SIZE"
check_budget "$BUDGET"
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/llava-v1.5-${MODEL_SIZE}-visionzip-projector-${BUDGET}}
SUBSET="$DATA_DIR/llava_v1_5_mix665k_10pct_seed${SUBSET_SEED}.json"

# the 1/10 subset, made once and reproducibly (same file for every budget)
if [[ "${DRY_RUN:-0}" != "1" ]]; then
    "${PYTHON:-python}" "$ROOT/scripts/make_subset.py" --input "$DATA_DIR/llava_v1_5_mix665k.json" --output "$SUBSET" \
        --fraction 0.1 --seed "$SUBSET_SEED"
fi

launch_training \
    --deepspeed "$DS_CONFIGS/zero2.json" \
    --model_name_or_path "$LLAVA_CKPT" \
    --version v1 \
    --data_path "$SUBSET" \
    --image_folder "$DATA_DIR" \
    --vision_tower "$VISION_TOWER" \
    --tune_mm_mlp_adapter True \
    --compression "$COMPRESSION" \
    --image_aspect_ratio pad \
    --group_by_modality_length True \
    --bf16 True \
    --output_dir "$OUTPUT_DIR" \
    --num_train_epochs 1 \
    --per_device_train_batch_size "$PER_DEVICE_BATCH" \
    --gradient_accumulation_steps "$GRAD_ACCUM" \
    --eval_strategy no \
    --save_strategy steps \
    --save_steps 200 \
    --save_total_limit 1 \
    --learning_rate 2e-5 \
    --weight_decay 0. \
    --warmup_steps 0.03 \
    --lr_scheduler_type cosine \
    --logging_steps 1 \
    --tf32 True \
    --model_max_length 2048 \
    --gradient_checkpointing True \
    --dataloader_num_workers 4 \
    --lazy_preprocess True \
    --report_to "$REPORT_TO" \
    --run_name "$(basename "$OUTPUT_DIR")"
