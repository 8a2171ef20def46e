#!/usr/bin/env bash
# Shared by scripts/v1_5/eval/<benchmark>.sh (and scripts/v1_6/eval/*, which run these with MODEL_FAMILY=v1.6).
# Source it with the script's arguments:   source _common.sh METHOD [BUDGET]
#   METHOD: none | visionzip | vispruner;  BUDGET: total visual tokens from the paper (v1.5: 192 128 64,
#   v1.6: 640 320 160) or, for VisionZip, the per-image/crop split D,C (e.g. 54,10). Ignored for none.
# Environment (all optional):
#   MODEL_PATH    checkpoint (default liuhaotian/llava-v1.5-7b; liuhaotian/llava-v1.6-vicuna-7b for v1.6)
#   MODEL_BASE    base model of a projector-only / LoRA checkpoint
#   CKPT          name of the model in answer and results folders (default: last part of MODEL_PATH)
#   CONV_MODE     prompt template (default vicuna_v1; mistral_instruct / chatml_direct for other NeXT models)
#   MODEL_FAMILY  v1.5 | v1.6 | qwen-vl | cogvlm: which budget table BUDGET refers to (set by the v1_6, qwen_vl, cogvlm scripts)
#   EVAL_DIR      benchmark data (default ./playground/data/eval; layout in playground/README.md)
#   RESULTS_DIR   scores, one json per benchmark (default $EVAL_DIR/results), read by llava.eval.report
#   DEVICE DTYPE  auto (cuda + float16 when available, else cpu + float32) or explicit values
#   BATCH_SIZE    questions per generate() call (default 1, LLaVA's setting; >1 left-pads)
#   MAX_NEW_TOKENS  cap on the tokens generated per answer (default: the benchmark's own, 128 or 1024, as
#                 LLaVA's scripts); a smaller cap is for quick checks of the pipeline, not for scores
#   PYTHON        interpreter (default python)
#   CUDA_VISIBLE_DEVICES  one generation shard per listed GPU, merged afterwards (as LLaVA's scripts)
set -euo pipefail

METHOD_ARG=${1:-none}
BUDGET_ARG=${2:-}
PYTHON=${PYTHON:-python}
MODEL_FAMILY=${MODEL_FAMILY:-v1.5}
if [ "$MODEL_FAMILY" = "v1.6" ]; then
    MODEL_PATH=${MODEL_PATH:-liuhaotian/llava-v1.6-vicuna-7b}
else
    MODEL_PATH=${MODEL_PATH:-liuhaotian/llava-v1.5-7b}
fi
MODEL_BASE=${MODEL_BASE:-}
CKPT=${CKPT:-$(basename "$MODEL_PATH")}
CONV_MODE=${CONV_MODE-vicuna_v1}  # set but empty: the checkpoint's own template (native families)
EVAL_DIR=${EVAL_DIR:-./playground/data/eval}
RESULTS_DIR=${RESULTS_DIR:-$EVAL_DIR/results}
DEVICE=${DEVICE:-auto}
DTYPE=${DTYPE:-auto}
BATCH_SIZE=${BATCH_SIZE:-1}

# METHOD, COMPRESSION, BUDGET_LABEL, VISUAL_TOKENS (fails here on an unknown method or budget)
BUDGET_VARS=$("$PYTHON" -m llava.eval.budgets --family "$MODEL_FAMILY" "$METHOD_ARG" ${BUDGET_ARG:+"$BUDGET_ARG"}) || exit 2
eval "$BUDGET_VARS"
# answers and results of one setting live under <model>/<method>/<budget>
RUN_DIR="$CKPT/$METHOD/$BUDGET_LABEL"
RESULT_DIR="$RESULTS_DIR/$RUN_DIR"
mkdir -p "$RESULT_DIR"
echo "[$CKPT] $METHOD budget=$BUDGET_LABEL (${VISUAL_TOKENS} visual tokens, --compression $COMPRESSION)"

# generate_answers FORMAT QUESTION_FILE IMAGE_FOLDER ANSWERS_DIR [extra llava.eval.generate args...]
# One shard per GPU of CUDA_VISIBLE_DEVICES, in parallel; then ANSWERS_DIR/merge.jsonl.
# Shards resume where they stopped: run the script again after a crash.
generate_answers() {
    local format=$1 questions=$2 images=$3 answers_dir=$4
    shift 4
    local gpu_list="${CUDA_VISIBLE_DEVICES:-0}"
    local -a gpus pids shards
    IFS=',' read -ra gpus <<< "$gpu_list"
    local chunks=${#gpus[@]}
    mkdir -p "$answers_dir"
    for idx in $(seq 0 $((chunks - 1))); do
        shards+=("$answers_dir/${chunks}_${idx}.jsonl")
        CUDA_VISIBLE_DEVICES=${gpus[$idx]} "$PYTHON" -m llava.eval.generate \
            --format "$format" \
            --model-path "$MODEL_PATH" ${MODEL_BASE:+--model-base "$MODEL_BASE"} \
            --question-file "$questions" \
            ${images:+--image-folder "$images"} \
            --answers-file "${shards[$idx]}" \
            --num-chunks "$chunks" --chunk-idx "$idx" \
            --method "$METHOD" ${BUDGET_ARG:+--budget "$BUDGET_ARG"} --budget-family "$MODEL_FAMILY" \
            --batch-size "$BATCH_SIZE" --device "$DEVICE" --dtype "$DTYPE" \
            --temperature 0 ${CONV_MODE:+--conv-mode "$CONV_MODE"} "$@" \
            ${MAX_NEW_TOKENS:+--max-new-tokens "$MAX_NEW_TOKENS"} &
        pids+=($!)
    done
    local failed=0
    for pid in "${pids[@]}"; do
        wait "$pid" || failed=1
    done
    if [ "$failed" -ne 0 ]; then
        echo "a generation shard failed; fix the error above and run the script again (finished answers are kept)" >&2
        return 1
    fi
    "$PYTHON" -m llava.eval.merge_answers --output "$answers_dir/merge.jsonl" "${shards[@]}"
}

# note_external BENCHMARK WHAT ANSWERS_DIR: how to record a score computed outside (server / GPT judge)
note_external() {
    echo "-> $2"
    echo "   then record its score:  $PYTHON -m llava.eval.evaluate external --name $1 --score <score> \\"
    echo "       --settings-file $3/merge.settings.json --output $RESULT_DIR/$1.json"
}
