#!/usr/bin/env bash
# VQAv2 test-dev: answers converted for the EvalAI server (the score comes back from there).
# Usage: bash scripts/v1_5/eval/vqav2.sh METHOD [BUDGET]
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh" "$@"
SPLIT=llava_vqav2_mscoco_test-dev2015
D=$EVAL_DIR/vqav2
ANSWERS=$D/answers/$SPLIT/$RUN_DIR
UPLOAD=$D/answers_upload/$SPLIT/$RUN_DIR/$CKPT.json
generate_answers vqa "$D/$SPLIT.jsonl" "$D/test2015" "$ANSWERS"
"$PYTHON" -m llava.eval.convert vqav2 \
    --test-question-file "$D/llava_vqav2_mscoco_test2015.jsonl" \
    --split-question-file "$D/$SPLIT.jsonl" \
    --result-file "$ANSWERS/merge.jsonl" \
    --output "$UPLOAD"
note_external vqav2 "upload $UPLOAD to EvalAI (VQA Challenge, test-dev phase)" "$ANSWERS"
