#!/usr/bin/env bash
# Mode 1, training-free VisionZip: nothing to train. A released LLaVA-1.5 checkpoint is evaluated with its
# visual tokens compressed at inference; the budget is an argument of the evaluation scripts
# (scripts/v1_5/eval/<benchmark>.sh METHOD BUDGET), not a property of a checkpoint. This runs them for
# every budget:
#   BENCHMARKS="pope gqa" bash scripts/v1_5/train/training_free.sh        (default: all of the paper's)
#
# A projector tuned by finetune_projector_visionzip.sh (mode 2) is evaluated the same way on top of its
# base (its config.json records the compression it was tuned with):
#   MODEL_PATH=./checkpoints/llava-v1.5-7b-visionzip-projector-64 MODEL_BASE=liuhaotian/llava-v1.5-7b \
#   BUDGETS=64 bash scripts/v1_5/train/training_free.sh
set -euo pipefail

MODEL_SIZE=${MODEL_SIZE:-7b}          # 7b or 13b
BUDGETS=${BUDGETS:-"192 128 64"}      # VisionZip's LLaVA-1.5 budgets (visual tokens per image)
METHOD=${METHOD:-visionzip}           # visionzip or vispruner (none = the 576-token baseline)
BENCHMARKS=${BENCHMARKS:-"gqa mmbench mme pope sqa vqav2 textvqa mmmu seed mmvet llavabench"}

source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
select_model_size "$MODEL_SIZE"
export MODEL_PATH=${MODEL_PATH:-$LLAVA_CKPT}
EVAL_SCRIPTS="$ROOT/scripts/v1_5/eval"

for budget in $BUDGETS; do
    check_budget "$budget"
    for bench in $BENCHMARKS; do
        cmd=(bash "$EVAL_SCRIPTS/$bench.sh" "$METHOD" "$budget")
        if [[ "${DRY_RUN:-0}" == "1" ]]; then
            echo "MODEL_PATH=$MODEL_PATH ${MODEL_BASE:+MODEL_BASE=$MODEL_BASE }${cmd[*]}"
        else
            (cd "$ROOT" && "${cmd[@]}")
        fi
    done
done
