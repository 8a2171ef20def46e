#!/usr/bin/env bash
# Full fine-tuning with VisionZip from the start: LLaVA-1.5 stage 2 (vicuna-v1.5 + the stage-1 projector,
# LLM and projector train) on llava_v1_5_mix665k.json, lr 2e-5, cosine, warmup 0.03, 1 epoch, global
# batch 128, with the LLM seeing BUDGET visual tokens per image instead of 576.
# 8x 24 GB GPUs (3090 / 4090): PER_DEVICE_BATCH=4 GRAD_ACCUM=4 (see finetune_visionzip_24gb.sh).
set -euo pipefail

MODEL_SIZE=${MODEL_SIZE:-7b}              # 7b or 13b
BUDGET=${BUDGET:-64}                      # visual tokens per image (64, 128, 192); METHOD=visionzip or COMPRESSION=SPEC
NUM_GPUS=${NUM_GPUS:-8}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-16}  # NUM_GPUS x PER_DEVICE_BATCH x GRAD_ACCUM = 128
GRAD_ACCUM=${GRAD_ACCUM:-1}
ZERO=${ZERO:-zero3}                       # zero2, zero3 or zero3_offload (configs/deepspeed/)
DATA_DIR=${DATA_DIR:-./playground/data}
VISION_TOWER=${VISION_TOWER:-openai/clip-vit-large-patch14-336}
REPORT_TO=${REPORT_TO:-wandb}

source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
select_model_size "$MODEL_SIZE"
check_budget "$BUDGET"
STAGE1_PROJECTOR=${STAGE1_PROJECTOR:-./checkpoints/$STAGE1_NAME/mm_projector.bin}
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/llava-v1.5-${MODEL_SIZE}-visionzip-${BUDGET}}
NODES=1
if [[ -n "${HOSTFILE:-}" ]]; then NODES=$(grep -cv '^\s*\(#\|$\)' "$HOSTFILE"); fi
GLOBAL_BATCH=$((NODES * NUM_GPUS * PER_DEVICE_BATCH * GRAD_ACCUM))
if [[ "$GLOBAL_BATCH" != 128 ]]; then
    echo "warning: global batch is $GLOBAL_BATCH (nodes $NODES x GPUs $NUM_GPUS x batch $PER_DEVICE_BATCH x accumulation $GRAD_ACCUM); the LLaVA-1.5 recipe uses 128" >&2
fi

launch_training \
    --deepspeed "$DS_CONFIGS/$ZERO.json" \
    --model_name_or_path "$VICUNA" \
    --version v1 \
    --data_path "$DATA_DIR/llava_v1_5_mix665k.json" \
    --image_folder "$DATA_DIR" \
    --vision_tower "$VISION_TOWER" \
    --pretrain_mm_mlp_adapter "$STAGE1_PROJECTOR" \
    --mm_projector_type mlp2x_gelu \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
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
    --save_steps 1000 \
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
